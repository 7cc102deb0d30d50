"""Training data: curated shards read by sidecar index, mixed by kind, tokenized and packed into
fixed-length sequences, resumable from JSON-able state."""
