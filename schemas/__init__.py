"""Data contracts: one definition per stage record; Spark and Arrow schemas both come from it."""
from capfilt.schemas.contract import Contract, Field, SchemaError, column_types
from capfilt.schemas.records import CANDIDATE, CAPTIONED, CONTRACTS, CURATED, DOWNLOADED, PAIRS, REJECTS, SCORED

__all__ = ["Contract", "Field", "SchemaError", "column_types", "CANDIDATE", "CAPTIONED", "CONTRACTS",
           "CURATED", "DOWNLOADED", "PAIRS", "REJECTS", "SCORED"]
