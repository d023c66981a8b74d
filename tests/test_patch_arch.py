"""Every architecture in fasteer's table: patched model == forward-hook reference.

Tiny random fp32 models of each family (GPT-NeoX and Falcon in their parallel and
sequential forms). Logits within 1e-5 and identical greedy tokens with a dynamic and a
static KV cache, for single-site steering at each site and for multi-layer, multi-site
steering; a padded batch throughout (left padding here, right padding in
test_patch_positions). Each case also checks that the steering changed the output, so
equality with the reference is not vacuous.
"""
import pytest
import torch

import fasteer as fs
from fasteer.sites import ARCHITECTURES, model_sites
from hook_reference import (ARCHS, one_thread, assert_same, branch_path, cached_model, fasteer_outputs,
                            pair, plain_outputs, prompt_batch, random_vectors,
                            reference_outputs)  # noqa: F401 (one_thread: autouse fixture)

D, N_LAYERS = 32, 3


def _run(arch, ivs, caches=("dynamic", "static"), pad="left", seed=1):
    model = cached_model(arch)
    ids, mask = prompt_batch(3, 7, pad, seed=seed)
    out = fasteer_outputs(model, [([a for a, _ in ivs], None)], ids, mask, caches)
    ref = reference_outputs(model, arch, [[b for _, b in ivs]] * 3, ids, mask, caches)
    assert_same(out, ref)
    plain = plain_outputs(model, ids, mask, caches=())
    effect = float((out[0] - plain[0]).abs().max())
    assert effect > 1e-2, f"steering had no visible effect ({effect:.2g})"


def test_table_covers_the_issue_list():
    wanted = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2",
              "gemma3_text", "phi3", "gpt2", "gpt_neox", "olmo2", "falcon",
              # issue 21: the families people run today
              "qwen2_moe", "phi", "stablelm", "cohere", "cohere2", "granite", "olmo", "olmo3",
              "smollm3", "llama4_text", "glm4", "deepseek_v3", "gpt_oss", "mistral3",
              "ministral", "ministral3", "gemma3"}
    assert wanted <= set(ARCHITECTURES)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_table_resolves_without_fallback(arch):
    sites = model_sites(cached_model(arch))
    assert not sites.is_fallback
    assert sites.n_layers == N_LAYERS and sites.hidden == D
    # one carrier per stream point: resid_pre of every layer, the final norm, resid_mid
    # where the block has one; and one per component output (attn_out, mlp_out)
    n_mid = N_LAYERS if branch_path(arch) is not None else 0
    assert len(sites.points) == N_LAYERS + 1 + n_mid + 2 * N_LAYERS


@pytest.mark.parametrize("arch", list(ARCHS))
def test_multi_layer_multi_site(arch):
    vecs = random_vectors(range(N_LAYERS), D, seed=5, scale=2.0)
    ivs = [pair("add", [0, 2], vectors=vecs, value=3.0),                     # resid_post, last too
           pair("clamp", [1], site="resid_pre", vectors=vecs, value=2.0),
           pair("scale", [2], site="resid_pre", value=0.7),
           pair("add", [0], site="resid_pre", vectors=vecs, value=-1.5)]     # the embeddings
    if branch_path(arch) is not None:
        ivs.append(pair("ablate", [0, 1], site="resid_mid", vectors=vecs))
    _run(arch, ivs)


@pytest.mark.parametrize("site", ["resid_pre", "resid_mid", "resid_post"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_single_layer_each_site(arch, site):
    if site == "resid_mid" and branch_path(arch) is None:
        model = cached_model(arch)
        with pytest.raises(ValueError, match="resid_mid.*not supported"):
            fs.steer(model, fs.Add(torch.ones(D), 1.0, layers=[1], site="resid_mid"))
        fs.patch(model).unpatch()      # the failed steer() left nothing installed
        return
    layer = {"resid_pre": 0, "resid_mid": 1, "resid_post": N_LAYERS - 1}[site]
    vecs = random_vectors([layer], D, seed=11, scale=3.0)
    _run(arch, [pair("add", [layer], site=site, vectors=vecs, value=2.0)], caches=("dynamic",))
