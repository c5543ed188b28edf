"""recur.data: tokenizers and streaming, packed, sharded, exactly resumable loaders.

    from recur.data import DataConfig, load_tokenizer, check_vocab, build_loader
    config = DataConfig.from_dict(recipe["data"])          # DataError names a bad key
    tokenizer = load_tokenizer(config.tokenizer)           # "byte", a folder, or a .gguf file
    check_vocab(tokenizer, model.config.vocab_size)
    train = build_loader(config, tokenizer, batch_size=8, rank=rank, world_size=world)
    batch = next(iter(train))  # input_ids, position_ids (restart at 0 per document), labels: [8, seq_len]
"""
from .config import DataConfig, DataError, SourceConfig
from .pipeline import PackedDataset, build_loader, in_validation
from .prepared import load_data_config, open_prepared, prepare
from .tokenizer import byte_tokenizer, check_vocab, load_tokenizer, train_tokenizer

__all__ = ["DataConfig", "DataError", "SourceConfig", "PackedDataset", "build_loader", "in_validation",
           "load_data_config", "open_prepared", "prepare", "byte_tokenizer", "check_vocab", "load_tokenizer",
           "train_tokenizer"]
