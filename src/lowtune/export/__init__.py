"""Export: merge an adapter into its base, model cards, hub upload and deploy bundles."""
