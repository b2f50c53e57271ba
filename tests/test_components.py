"""Connected components (large-star/small-star in DataFrame operations, or a union-find on the driver for
small edge lists) against a breadth-first search."""
import random

import pytest

from capfilt.pipelines.components import ComponentsDidNotConverge, connected_components


def reference_components(edges) -> dict[str, str]:
    """node -> smallest node of its component, by breadth-first search (independent of the
    union-find the driver path uses)."""
    neighbours: dict[str, set] = {}
    for a, b in edges:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    result: dict[str, str] = {}
    for start in neighbours:
        if start in result:
            continue
        seen, frontier = {start}, [start]
        while frontier:
            frontier = [n for x in frontier for n in neighbours[x] if n not in seen]
            seen.update(frontier)
        result.update(dict.fromkeys(seen, min(seen)))
    return result


def spark_components(spark, edges, **kwargs) -> dict[str, str]:
    df = spark.createDataFrame(edges, "src string, dst string")
    return {r.node: r.component for r in connected_components(df, **kwargs).collect()}


@pytest.mark.parametrize("driver_max_edges", [0, 10**6], ids=["spark", "driver"])
@pytest.mark.slow
def test_components_equal_a_breadth_first_search_on_random_graphs_chains_and_stars(spark, driver_max_edges):
    rng = random.Random(3)
    graphs = []
    # Sparse random graphs over string ids of mixed lengths (string order, not numeric order).
    for _ in range(2):
        ids = [f"n{rng.randrange(10**6)}" for _ in range(150)]
        graphs.append([(rng.choice(ids), rng.choice(ids)) for _ in range(120)])
    # A path of 200 nodes in a shuffled id order: the longest distance to the minimum.
    order = [f"p{i:04d}" for i in range(200)]
    rng.shuffle(order)
    graphs.append(list(zip(order, order[1:])))
    # Stars: one centred on the minimum, one on the maximum (every leaf must move), a second root.
    graphs.append([("s000", f"s{i:03d}") for i in range(1, 60)] + [("t999", f"t{i:03d}") for i in range(60)]
                  + [("u5", "u5")])
    # All of them as one graph (one Spark run: the path sets the number of rounds), with reversed
    # duplicates.
    edges = [e for g in graphs for e in g]
    edges += [(b, a) for a, b in edges[:50]]
    assert spark_components(spark, edges, driver_max_edges=driver_max_edges) == reference_components(edges)


@pytest.mark.parametrize("driver_max_edges", [0, 10**6], ids=["spark", "driver"])
def test_components_of_empty_and_self_loop_only_graphs(spark, driver_max_edges):
    assert spark_components(spark, [], driver_max_edges=driver_max_edges) == {}
    assert spark_components(spark, [("a", "a"), ("b", None)], driver_max_edges=driver_max_edges) == {"a": "a"}


def test_integer_ids_keep_their_type_and_order_on_the_driver(spark):
    df = spark.createDataFrame([(10, 9), (9, 100), (7, 7)], "src long, dst long")
    result = connected_components(df, driver_max_edges=10)
    assert dict(result.dtypes) == {"node": "bigint", "component": "bigint"}
    assert {r.node: r.component for r in result.collect()} == {9: 9, 10: 9, 100: 9, 7: 7}


@pytest.mark.slow
def test_components_with_a_checkpoint_dir(spark, tmp_path):
    edges = [("c", "b"), ("b", "a"), ("x", "y")]
    assert spark_components(spark, edges, checkpoint_dir=str(tmp_path), driver_max_edges=0) == {
        "a": "a", "b": "a", "c": "a", "x": "x", "y": "x"}
    assert any(tmp_path.iterdir())


def test_components_refuse_to_run_past_max_rounds(spark):
    path = [(f"p{i:03d}", f"p{i + 1:03d}") for i in range(40)]
    with pytest.raises(ComponentsDidNotConverge, match="did not converge in 1 rounds"):
        spark_components(spark, path, max_rounds=1, driver_max_edges=0)
