"""Connected components of an edge list in plain DataFrame operations (GraphFrames' jar cannot be
fetched here).

Alternating large-star / small-star (Kiveris et al., "Connected Components in MapReduce and Beyond",
SoCC 2014). Edges are kept oriented (v, u) with u < v. Per round:

    large-star  every node x links each larger neighbour to m(x), the smallest of x and its neighbours
    small-star  every node v links itself and each smaller neighbour to the smallest of them

Both keep the components and shrink distances to each component's minimum; the fixed point is a
forest of stars, each centred on its component's smallest id. Convergence is read off the large-star
step, which groups by node anyway: the edges form such a star forest exactly when every node either
has no smaller neighbour, or has exactly one and no larger one. Each step is checkpointed, so the
plan of round k does not carry rounds 1..k-1. O(log^2 n) rounds in the worst case; a long path
of 200 nodes takes a handful.

An edge list of at most `driver_max_edges` distinct edges is solved on the driver instead (a
union-find over the collected edges, the same result): each round costs two Spark jobs, seconds at
small sizes, where the whole list fits in a few MB.
"""
from __future__ import annotations

import uuid

DEFAULT_MAX_ROUNDS = 100
DEFAULT_DRIVER_MAX_EDGES = 100_000  # ~10-20 MB of driver memory with string ids


class ComponentsDidNotConverge(RuntimeError):
    pass


def _materialise(df, checkpoint_dir: str | None):
    if checkpoint_dir is None:
        return df.localCheckpoint(eager=True)
    return df.checkpoint(eager=True)


def _large_star(edges):
    """(x, y, m, bad): every edge seen from both ends, m = min(x, neighbours of x), bad = x breaks
    the star-forest shape (two smaller neighbours, or a smaller and a larger one)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    both = edges.select(F.col("v").alias("x"), F.col("u").alias("y")).unionByName(
        edges.select(F.col("u").alias("x"), F.col("v").alias("y")))
    by_node = Window.partitionBy("x")
    smaller = F.sum((F.col("y") < F.col("x")).cast("int")).over(by_node)
    larger = F.max(F.col("y") > F.col("x")).over(by_node)
    return both.select("x", "y", F.least(F.col("x"), F.min("y").over(by_node)).alias("m"),
                       ((smaller > 1) | ((smaller == 1) & larger)).alias("bad"))


def _small_star(edges):
    """(v, u), distinct: each node v and its smaller neighbours linked to the smallest of them."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    m = F.min("u").over(Window.partitionBy("v"))
    linked = edges.select("v", "u", m.alias("m"))
    return (linked.filter(F.col("u") != F.col("m")).select(F.col("u").alias("v"), F.col("m").alias("u"))
            .unionByName(linked.select("v", F.col("m").alias("u")))
            .distinct())


def union_find(edges) -> dict:
    """{node: the smallest node of its component} for every node named by an (a, b) edge."""
    parent: dict = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in list(parent)}


def _on_the_driver(oriented):
    """(node, component) from the collected edges (union_find)."""
    from pyspark.sql.types import StructField, StructType
    kind = oriented.schema["v"].dataType
    schema = StructType([StructField("node", kind, False), StructField("component", kind, False)])
    return oriented.sparkSession.createDataFrame(list(union_find(oriented.select("v", "u").collect()).items()), schema)


def connected_components(edges_df, src: str = "src", dst: str = "dst", checkpoint_dir: str | None = None,
                         max_rounds: int = DEFAULT_MAX_ROUNDS, driver_max_edges: int = DEFAULT_DRIVER_MAX_EDGES):
    """DataFrame(node, component): every node named by an edge, with component = the smallest node
    id of its connected component (in the id column's ordering: for strings, code point order).
    Edges are undirected; duplicates and self-loops are allowed (a node with only a self-loop is its
    own component); edges with a null end are ignored.

    checkpoint_dir: None checkpoints each step locally (executor storage, like localCheckpoint);
    a directory makes the SparkContext checkpoint there (reliable, survives a lost executor).
    Raises ComponentsDidNotConverge after max_rounds rounds without reaching the fixed point.
    driver_max_edges: at most this many distinct edges are solved on the driver (0: always in Spark).
    """
    from pyspark.sql import Observation
    from pyspark.sql import functions as F

    if checkpoint_dir is not None:
        edges_df.sparkSession.sparkContext.setCheckpointDir(checkpoint_dir)
    ends = edges_df.select(F.col(src).alias("a"), F.col(dst).alias("b")).dropna()
    # Materialised once: the node list below must not run the caller's (maybe costly) plan again.
    size = Observation(f"components-{uuid.uuid4().hex}-edges")
    oriented = _materialise(ends.select(F.greatest("a", "b").alias("v"), F.least("a", "b").alias("u")).distinct()
                            .observe(size, F.count(F.lit(1)).alias("edges")), checkpoint_dir)
    if size.get["edges"] <= driver_max_edges:
        return _on_the_driver(oriented)
    nodes = oriented.select(F.col("v").alias("node")).unionByName(oriented.select(F.col("u").alias("node"))).distinct()
    edges = oriented.filter(F.col("v") != F.col("u"))
    for round_ in range(max_rounds):
        # The convergence count rides on the checkpoint's own job (an Observation), not a job of its own.
        seen = Observation(f"components-{uuid.uuid4().hex}-{round_}")
        large = _materialise(_large_star(edges).observe(seen, F.count(F.when(F.col("bad"), 1)).alias("bad")),
                             checkpoint_dir)
        if seen.get["bad"] == 0:
            break  # the edges are already stars around each component's minimum
        linked = large.filter(F.col("y") > F.col("x")).select(F.col("y").alias("v"), F.col("m").alias("u"))
        edges = _materialise(_small_star(linked), checkpoint_dir)
    else:
        raise ComponentsDidNotConverge(
            f"connected components did not converge in {max_rounds} rounds of large-star/small-star; "
            f"raise max_rounds (the worst case grows as log^2 of the number of nodes)")
    parent = edges.select(F.col("v").alias("node"), F.col("u").alias("parent"))
    return (nodes.join(parent, "node", "left")
            .select("node", F.coalesce("parent", "node").alias("component")))
