"""Data: region-feature readers and writers, vocabularies, datasets, datamodules, the synthetic world."""
