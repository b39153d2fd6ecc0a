"""The base model: loading (`loader`), per-architecture K/V paths (`families`), prefix math
(`prefix_kv`)."""
