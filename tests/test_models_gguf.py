"""Loading a GGUF model parses the file once for its tokenizer, config and weights, and gets what transformers'
three separate parses get."""
import gguf
import pytest
import torch

from conftest import CHATML, tiny_llama
from tailorlm.config import ModelSpec
from tailorlm.export.gguf_writer import write_gguf
from tailorlm.export.layout import Layout
from tailorlm.models import gguf_parse
from tailorlm.models.loading import load_model, load_tokenizer


def _write(model, tokenizer, path):
    layout = Layout(CHATML, True, None, "<|im_end|>", tokenizer.convert_tokens_to_ids("<|im_end|>"))
    write_gguf(model, tokenizer, path, "f16", "", layout)
    return path


@pytest.fixture
def counted_parses(monkeypatch):
    """The GGUF files the gguf package really parses (built GGUFReaders), in order."""
    parsed = []
    real = gguf.GGUFReader

    class Counted(real):
        def __init__(self, path, *args, **kwargs):
            parsed.append(str(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counted)
    return parsed


def test_tokenizer_config_and_weights_share_one_parse(tiny_tokenizer, tmp_path, counted_parses):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_llama(len(tiny_tokenizer), seed=3)
    path = _write(model, tiny_tokenizer, tmp_path / "tiny.gguf")
    spec = ModelSpec(path=str(path))
    tokenizer = load_tokenizer(spec)
    loaded = load_model(spec, torch.device("cpu"), tokenizer=tokenizer)
    assert counted_parses == [str(path)]
    # the names are the package's own again, and nothing of the file is held after the load
    assert gguf.GGUFReader.__name__ == "Counted" and gguf.get_tensor_name_map.__module__ == "gguf.tensor_mapping"
    assert gguf_parse._kept == {} and gguf_parse._users == 0

    plain_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    plain_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert len(counted_parses) == 4  # transformers alone: a parse for the weights, the config, the tokenizer
    plain = plain_model.state_dict()
    assert all(torch.equal(tensor, plain[name]) for name, tensor in loaded.model.state_dict().items())
    assert tokenizer("the market rose")["input_ids"] == plain_tokenizer("the market rose")["input_ids"]


def test_a_file_rewritten_between_loads_is_parsed_again(tiny_tokenizer, tmp_path, counted_parses):
    path = tmp_path / "tiny.gguf"
    spec = ModelSpec(path=str(path))
    _write(tiny_llama(len(tiny_tokenizer), seed=1), tiny_tokenizer, path)
    load_tokenizer(spec)  # its reader is kept for the weights' load
    _write(tiny_llama(len(tiny_tokenizer), seed=2), tiny_tokenizer, path)
    loaded = load_model(spec, torch.device("cpu")).model
    assert len(counted_parses) == 2  # the first file's reader is not handed out for the second
    expected = tiny_llama(len(tiny_tokenizer), seed=2).model.embed_tokens.weight.half().float()
    assert torch.equal(loaded.model.embed_tokens.weight, expected)


def test_a_failed_load_puts_the_names_back_and_keeps_nothing(tiny_tokenizer, tmp_path):
    from tailorlm.errors import TailorError

    real = (gguf.GGUFReader, gguf.get_tensor_name_map)
    whole = _write(tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:len(whole) // 3])  # the header is intact, the metadata or tensors are not
    with pytest.raises(TailorError, match="cut.gguf"):
        load_tokenizer(ModelSpec(path=str(cut)))
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == real
    assert gguf_parse._kept == {} and gguf_parse._users == 0


def test_only_the_loading_thread_shares_a_parse(tiny_tokenizer, tmp_path, counted_parses):
    import threading

    path = _write(tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "tiny.gguf")
    readers = {}

    def elsewhere():  # e.g. an export reading the file while the load runs
        readers["other"] = [gguf.GGUFReader(path), gguf.GGUFReader(path)]

    with gguf_parse.shared_parse():
        readers["loading"] = [gguf.GGUFReader(path), gguf.GGUFReader(path)]
        other = threading.Thread(target=elsewhere)
        other.start()
        other.join()
    gguf_parse.forget()
    assert readers["loading"][0] is readers["loading"][1]
    assert readers["other"][0] is not readers["other"][1]
    assert len(counted_parses) == 3


def test_a_search_loads_a_gguf_once_and_every_trial_starts_from_the_same_weights(tiny_tokenizer, tmp_path,
                                                                                   counted_parses):
    from tailorlm.models import kept_weights

    path = _write(tiny_llama(len(tiny_tokenizer), seed=4), tiny_tokenizer, tmp_path / "tiny.gguf")
    spec, ids = ModelSpec(path=str(path)), torch.tensor([[3, 9, 4, 7]])
    with kept_weights.keeping():
        first = load_model(spec, torch.device("cpu")).model
        (_, kept), = kept_weights._weights.values()
        assert kept["lm_head.weight"] is kept["model.embed_tokens.weight"]  # the tied head is kept once
        with torch.no_grad():
            expected = first(ids).logits
            for p in first.parameters():
                p.add_(1.0)  # a trial that trains the weights in place (full fine-tuning)
        second = load_model(spec, torch.device("cpu"))
        assert counted_parses == [str(path)]  # the second load neither parsed nor dequantized the file
        with torch.no_grad():
            assert torch.equal(second.model(ids).logits, expected)
        assert second.model.config.name_or_path == str(tmp_path)  # what PEFT writes as the adapter's base
        assert second.tokenizer("the market rose")["input_ids"] == tiny_tokenizer("the market rose")["input_ids"]
        assert second.model.lm_head.weight is not first.lm_head.weight
    assert kept_weights._weights == {} and kept_weights._tokenizers == {}  # nothing held once the search ends
    load_model(spec, torch.device("cpu"))
    assert len(counted_parses) == 2  # outside a search, every load reads the file
