"""A data contract: one list of fields from which the Spark StructType and the Arrow schema both come.

Types are tiny objects with a canonical name ("string", "list<float32>", "struct<text:string,...>").
Validation normalises the actual schema (Spark or Arrow) to the same names and compares, so one
error message can name every missing or mistyped column at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import pyarrow as pa


class SchemaError(ValueError):
    """Input does not match a contract; `problems` lists every missing or mistyped column."""

    def __init__(self, contract: str, problems: list[str], where: str = ""):
        self.contract = contract
        self.problems = problems
        place = f" in {where}" if where else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"data does not match the '{contract}' contract{place}:\n{lines}")


@dataclass(frozen=True)
class DataType:
    name: str

    def arrow(self) -> pa.DataType:
        return _ARROW_PRIMITIVES[self.name]

    def spark(self):
        from pyspark.sql import types as T
        return {
            "string": T.StringType(), "binary": T.BinaryType(), "bool": T.BooleanType(),
            "int32": T.IntegerType(), "int64": T.LongType(),
            "float32": T.FloatType(), "float64": T.DoubleType(),
        }[self.name]


@dataclass(frozen=True)
class ListType(DataType):
    item: DataType = None

    def arrow(self) -> pa.DataType:
        return pa.list_(self.item.arrow())

    def spark(self):
        from pyspark.sql import types as T
        return T.ArrayType(self.item.spark(), containsNull=True)


@dataclass(frozen=True)
class StructType(DataType):
    fields: tuple = ()

    def arrow(self) -> pa.DataType:
        return pa.struct([pa.field(f.name, f.type.arrow(), f.nullable) for f in self.fields])

    def spark(self):
        from pyspark.sql import types as T
        return T.StructType([T.StructField(f.name, f.type.spark(), f.nullable) for f in self.fields])


_ARROW_PRIMITIVES = {
    "string": pa.string(), "binary": pa.binary(), "bool": pa.bool_(),
    "int32": pa.int32(), "int64": pa.int64(), "float32": pa.float32(), "float64": pa.float64(),
}
STRING, BINARY, BOOL = DataType("string"), DataType("binary"), DataType("bool")
INT32, INT64 = DataType("int32"), DataType("int64")
FLOAT32, FLOAT64 = DataType("float32"), DataType("float64")


def list_of(item: DataType) -> ListType:
    return ListType(f"list<{item.name}>", item)


def struct_of(*fields: "Field") -> StructType:
    return StructType("struct<" + ",".join(f"{f.name}:{f.type.name}" for f in fields) + ">", tuple(fields))


@dataclass(frozen=True)
class Field:
    name: str
    type: DataType
    nullable: bool = True
    doc: str = ""


@dataclass(frozen=True)
class Contract:
    """A stage record. `extra_columns=True` lets columns beyond the contract ride along (LAION extras)."""

    name: str
    fields: tuple[Field, ...]
    doc: str = ""
    extra_columns: bool = True

    def __post_init__(self):
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"contract {self.name} repeats a field name: {names}")

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no field {name!r}")

    def extend(self, name: str, fields: Iterable[Field], doc: str = "", drop: Iterable[str] = ()) -> "Contract":
        dropped = set(drop)
        kept = tuple(f for f in self.fields if f.name not in dropped)
        return Contract(name, kept + tuple(fields), doc or self.doc, self.extra_columns)

    def spark_schema(self):
        from pyspark.sql import types as T
        return T.StructType([T.StructField(f.name, f.type.spark(), f.nullable) for f in self.fields])

    def arrow_schema(self) -> pa.Schema:
        return pa.schema([pa.field(f.name, f.type.arrow(), f.nullable) for f in self.fields])

    def problems(self, actual: dict[str, str]) -> list[str]:
        """Compare {column: canonical type name} with the contract; every problem, in field order."""
        out = []
        for f in self.fields:
            if f.name not in actual:
                out.append(f"missing column '{f.name}' (expected {f.type.name})")
            elif actual[f.name] != f.type.name:
                out.append(f"column '{f.name}' has type {actual[f.name]}, expected {f.type.name}")
        if not self.extra_columns:
            out += [f"unexpected column '{c}'" for c in actual if c not in self.names]
        return out

    def validate(self, schema, where: str = "") -> None:
        """Raise SchemaError naming every missing or mistyped column of a Spark or Arrow schema
        (or of a DataFrame / Arrow table, whose schema is taken)."""
        problems = self.problems(column_types(schema))
        if problems:
            raise SchemaError(self.name, problems, where)


def column_types(schema) -> dict[str, str]:
    """{column: canonical type name} for a Spark StructType/DataFrame or an Arrow schema/table."""
    schema = getattr(schema, "schema", schema)
    if isinstance(schema, pa.Schema):
        return {f.name: arrow_type_name(f.type) for f in schema}
    return {f.name: spark_type_name(f.dataType) for f in schema.fields}


def arrow_type_name(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t):
        return "binary"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return f"list<{arrow_type_name(t.value_type)}>"
    if pa.types.is_struct(t):
        return "struct<" + ",".join(f"{t.field(i).name}:{arrow_type_name(t.field(i).type)}"
                                    for i in range(t.num_fields)) + ">"
    for name, prim in _ARROW_PRIMITIVES.items():
        if t == prim:
            return name
    return str(t)


def spark_type_name(t) -> str:
    from pyspark.sql import types as T
    simple = {T.StringType: "string", T.BinaryType: "binary", T.BooleanType: "bool",
              T.IntegerType: "int32", T.LongType: "int64", T.FloatType: "float32", T.DoubleType: "float64"}
    for cls, name in simple.items():
        if isinstance(t, cls):
            return name
    if isinstance(t, T.ArrayType):
        return f"list<{spark_type_name(t.elementType)}>"
    if isinstance(t, T.StructType):
        return "struct<" + ",".join(f"{f.name}:{spark_type_name(f.dataType)}" for f in t.fields) + ">"
    return t.simpleString()
