"""KV-cache helpers on the caches every InternVL2 LLM returns: InternLM2's legacy tuples and the
DynamicCache of transformers' Qwen2, Phi3 and Llama."""
import pytest
import torch

from xtuner_vitask.errors import VITaskError
from xtuner_vitask.evaluation.kv_cache import cache_length, copy_kv_cache, repeat_kv_cache, select_kv_cache
from xtuner_vitask.testing import build_tiny_internvl

LLMS = ("internlm2", "qwen2", "phi3", "llama")


@pytest.fixture(scope="module")
def llms(tmp_path_factory):
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("kv")
    out = {}
    for llm in LLMS:
        folder = build_tiny_internvl(root / llm, llm=llm)
        out[llm] = AutoModel.from_pretrained(folder, trust_remote_code=True).language_model.eval()
    return out


@pytest.mark.parametrize("llm", LLMS)
@torch.no_grad()
def test_a_repeated_prompt_cache_continues_like_the_full_sequences(llms, llm):
    lm = llms[llm]
    prompts = torch.tensor([[11, 12, 13, 14], [21, 22, 23, 24]])
    continuations = torch.tensor([[31, 32], [41, 42], [51, 52]])  # 3 candidates after every prompt
    past = lm(input_ids=prompts, use_cache=True).past_key_values
    kind = type(past)
    assert (kind is tuple) == (llm == "internlm2")  # InternVL2's InternLM2 code keeps legacy tuples
    before = [t.clone() for t in (past[0] if kind is tuple else past.to_legacy_cache()[0])]

    repeated = repeat_kv_cache(past, 3)
    assert type(repeated) is kind and repeated is not past and cache_length(repeated) == 4
    after = past[0] if kind is tuple else past.to_legacy_cache()[0]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # the prompt's cache is untouched

    ids = continuations.repeat(2, 1)  # row r: prompt r // 3, candidate r % 3
    got = lm(input_ids=ids, past_key_values=repeated, use_cache=True).logits
    full = torch.cat([prompts.repeat_interleave(3, 0), ids], 1)
    expected = lm(input_ids=full).logits[:, 4:]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

    picked = select_kv_cache(past, [1])
    assert type(picked) is kind and cache_length(picked) == 4
    one = lm(input_ids=continuations[:1], past_key_values=picked).logits
    torch.testing.assert_close(one, lm(input_ids=torch.cat([prompts[1:], continuations[:1]], 1)).logits[:, 4:],
                               atol=1e-5, rtol=1e-4)
    copied = copy_kv_cache(past)
    assert type(copied) is kind and cache_length(copied) == 4


def test_bad_input_is_refused():
    with pytest.raises(VITaskError, match="tuple of \\(key, value\\) per layer: rank with strategy='full-sequence'"):
        repeat_kv_cache([torch.zeros(1)], 2)
    with pytest.raises(ValueError, match="at least 1"):
        repeat_kv_cache(((torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4)),), 0)
    assert cache_length(None) == 0
