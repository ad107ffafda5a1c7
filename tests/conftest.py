import copy

import pytest
import torch


@pytest.fixture
def gaussian() -> torch.Tensor:
    """A seeded Gaussian weight, shape (128, 512)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(128, 512, generator=g)


@pytest.fixture
def heavy_tailed() -> torch.Tensor:
    """A seeded Student-t (3 degrees of freedom) weight, shape (128, 512)."""
    torch.manual_seed(1)
    return torch.distributions.StudentT(3.0).sample((128, 512))


def saved_tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a lorq directory's model shards, by name."""
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def tiny_llama(seed: int = 0):
    return tiny_causal("llama", seed)


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    return BertModel(config).eval()


def tiny_causal(family: str, seed: int = 0, **sizes):
    """A tiny random causal LM of a transformers family (LLaMA, Mistral, Qwen2, OPT); ``sizes``
    override the config's fields (not for OPT)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    if family == "opt":
        config = transformers.OPTConfig(
            **common, ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64
        )
        return transformers.OPTForCausalLM(config).eval()
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    fields = dict(common, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=64)
    config = config_cls(**{**fields, **sizes})
    return model_cls(config).eval()


ARCH_SIZES = {  # what llama.cpp computes the way transformers does, rows K-quants tile
    "qwen3": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=128),
    "gemma2": dict(head_dim=64, query_pre_attn_scalar=64),
    "gemma3_text": dict(head_dim=64, query_pre_attn_scalar=64),
    "phi3": dict(pad_token_id=0, bos_token_id=0, eos_token_id=0, sliding_window=None),
    "starcoder2": dict(bos_token_id=0, eos_token_id=0),
}


TOKENIZER_TEXT = (
    "The quick brown fox jumps over the lazy dog. A model that is small still reads text, "
    "and the tokenizer learns the merges of the words it sees most often in this sentence. "
)


def byte_bpe_tokenizer(vocab_size: int = 320):
    """A byte-level BPE fast tokenizer of ``vocab_size`` tokens (256 bytes + merges learned from
    a fixed text: deterministic, no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    backend.train_from_iterator([TOKENIZER_TEXT] * 8, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


LLAMA3_ROPE = {  # Llama 3.1's RoPE scaling (llama.cpp: the rope_freqs tensor)
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def tiny_arch(model_type: str, seed: int = 0, **sizes):
    """A tiny random causal LM of a GGUF architecture (``lorq.io.gguf_arch``): 256-wide rows so
    that every K-quant fits, biases and norm weights random (so that a file that drops or shifts
    them shows); ``sizes`` override the config's fields."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    fields = dict(
        vocab_size=320,  # byte_bpe_tokenizer()'s bound
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    fields.update(copy.deepcopy({**ARCH_SIZES.get(model_type, {}), **sizes}))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **fields)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(torch.randn_like(param) * 0.1 + (0 if name.endswith("bias") else 1))
    return model


def low_rank_llama(seed: int = 0, **sizes):
    """A tiny LLaMA whose q/k projections have a strong rank-2 part (an adapter pays there, so a
    plan of ranks mixes them)."""
    model = tiny_causal("llama", seed, **sizes)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "k_proj")):
                out, inp = module.weight.shape
                low = torch.randn(out, 2, generator=g) @ torch.randn(2, inp, generator=g)
                module.weight.add_(0.3 * low)
    return model


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer():
    """A character-level fast tokenizer for the tiny models (vocab < 128) with a chat template."""
    import string

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": specials[3:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


class Hostile:
    """Unpickling this runs ``open(path, "w")``: the file's existence proves the code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def captured_inputs(model, ids, targets):
    """Every target's inputs, captured by forward hooks (not pre-hooks) during plain forwards."""
    seen = {name: [] for name in targets}
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: seen[name].append(args[0]))
        for name, m in targets.items()
    ]
    with torch.no_grad():
        for row in ids:
            model(input_ids=row[None])
    for handle in handles:
        handle.remove()
    return seen


def adapted(build, quant: str = "nf3", method: str = "loftq", rank: int = 4):
    """``build()`` compressed by ``method`` with trained-looking factors (B ≠ 0 everywhere)."""
    import lorq

    model = build()
    lorq.compress(model, lorq.CompressConfig(method=method, quant=quant, rank=rank, iters=1))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.add_(0.02 * torch.randn_like(param))
    return model


def train_b(model) -> None:
    """Seeded nonzero B in every QA-LoRA layer (compress starts them at 0), so that A and B
    both reach the logits."""
    from lorq.nn import QALoraLinear

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QALoraLinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def compress_to(model, out, config, sequential=None, **options):
    """``lorq.compress_model`` written to ``out`` as it goes (block by block), no evaluation;
    ``sequential`` overrides the config's."""
    from dataclasses import replace

    import lorq

    if sequential is not None:
        config = replace(config, sequential=sequential)
    return lorq.compress_model(model, config, out, eval_blocks=0, baseline=False, **options)


GGUF_TYPES = ["q4_k", "q6_k", "q8_0", "iq4_nl", "q5_k", "q3_k", "q2_k", "q4_0", "q5_1", "q4_1"]


def quantized_export(model, path):
    """``model``'s linears (each in the next of GGUF_TYPES), its token embedding (Q8_0) and
    everything else dense, written by lorq as a GGUF; returns the model with the weights the file
    holds (its logits: the oracle)."""
    import lorq
    from lorq.io.gguf_write import write_gguf

    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    linears = [n for n in linears if n != "lm_head"]
    layers = {}
    for i, name in enumerate(linears):
        module = model.get_submodule(name)
        layers[name] = lorq.quantize(
            module.weight.detach().float(), GGUF_TYPES[i % len(GGUF_TYPES)]
        )
        module.weight.data = layers[name].dequantize()
    embedding = model.get_input_embeddings()  # packed as SmolLM2's file holds it (Q8_0)
    name = next(n for n, m in model.named_modules() if m is embedding)
    layers[name] = lorq.quantize(embedding.weight.detach().float(), "q8_0")
    embedding.weight.data = layers[name].dequantize()
    own = {f"{n}.weight" for n in layers}
    dense = {n: p for n, p in model.named_parameters() if n not in own}
    for param in dense.values():  # GGUF holds a dense matrix as F16
        param.data = param.data.half().float() if param.dim() == 2 else param.data
    write_gguf(path, layers, dense, model.config.to_dict(), tokenizer=byte_bpe_tokenizer())
    return model
