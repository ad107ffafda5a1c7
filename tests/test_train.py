"""Fine-tuning. Oracles: loss and perplexity fall, frozen buffers bit-identical, gradients only on
LoRA factors (a direct backward), an uninterrupted run (resume), the NaN guard's checkpoints."""

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

import lorq
from lorq.train.data import Collator, ExampleDataset, training_examples
from lorq.train.trainer import FinetuneConfig, NonFiniteLoss, finetune, set_trainable


def compressed():
    model = tiny_llama()
    lorq.compress(model, lorq.CompressConfig(method="lq", quant="nf4", rank=4))
    return model


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return str(path)


def config(text_file, **kwargs):
    base = dict(data=text_file, steps=8, lr=3e-3, batch_size=2, seq_len=32, eval_blocks=2)
    return FinetuneConfig(**{**base, **kwargs})


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_training_lowers_loss_and_keeps_q_frozen(text_file, tmp_path):
    model, tok = compressed(), tiny_tokenizer()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    start = lora_state(model)
    result = finetune(model, tok, config(text_file, save_every=100), tmp_path / "ck", False)
    assert result.steps == 8 and len(result.losses) == 8
    assert result.losses[-1][1] < result.losses[0][1]
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())
    assert any(not torch.equal(start[n], p) for n, p in lora_state(model).items())
    assert result.tokens == 8 * 2 * 32 and result.tokens_per_second > 0


def test_only_lora_factors_get_gradients(text_file):
    model, tok = compressed(), tiny_tokenizer()
    names = set_trainable(model)
    assert names and all(n.endswith(("lora_A", "lora_B")) for n in names)
    batch = Collator(0)(ExampleDataset(training_examples(tok, text_file, 32, 2)))
    model.train()
    model(**batch).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(names)
    assert all(not b.requires_grad for b in model.buffers())


def test_resume_equals_an_uninterrupted_run(text_file, tmp_path):
    tok = tiny_tokenizer()
    straight = compressed()
    finetune(straight, tok, config(text_file, save_every=3), tmp_path / "a", False)

    def interrupt(event, values):
        if event == "step" and values["step"] == 7:
            raise KeyboardInterrupt

    interrupted = compressed()
    with pytest.raises(KeyboardInterrupt):
        finetune(
            interrupted, tok, config(text_file, save_every=3), tmp_path / "b", False, interrupt
        )
    resumed = compressed()
    result = finetune(resumed, tok, config(text_file, save_every=3), tmp_path / "b", True)
    assert result.resumed_from.endswith("checkpoint-6") and result.steps == 8
    expected, got = lora_state(straight), lora_state(resumed)
    assert all(torch.equal(expected[n], got[n]) for n in expected)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(text_file, tmp_path):
    model, tok = compressed(), tiny_tokenizer()
    layer = model.model.layers[0].self_attn.q_proj

    def poison(event, values):
        if event == "step" and values["step"] == 4:
            with torch.no_grad():
                layer.lora_B.fill_(float("nan"))

    with pytest.raises(NonFiniteLoss, match=r"step 5.*checkpoint-4"):
        finetune(model, tok, config(text_file, save_every=2), tmp_path / "ck", False, poison)
    kept = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert kept == ["checkpoint-2", "checkpoint-4"]


def test_sequence_longer_than_the_model_is_refused(text_file, tmp_path):
    with pytest.raises(ValueError, match="seq_len=128 is above the model's limit of 64"):
        finetune(compressed(), tiny_tokenizer(), config(text_file, seq_len=128), tmp_path, False)


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        (dict(steps=5, epochs=1.0), "not both"),
        (dict(steps=0), "steps=0"),
        (dict(lr=0.0), "lr=0.0"),
        (dict(warmup=1.5), "warmup=1.5"),
    ],
)
def test_config_errors(kwargs, text):
    with pytest.raises(ValueError, match=text):
        FinetuneConfig(**kwargs)
