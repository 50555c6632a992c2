"""Token picking for generation (greedy, temperature, top-k, top-p, seeds), the generation loop, the chat
prompt and the streamed text. The loop against the runtimes is tested in test_onnx.py, beside the family artifacts."""
import copy

import numpy as np
import pytest

from conftest import make_text, tiny_tokenizer
from wina_cli.errors import ConfigError
from wina_cli.sampling import Sampling, TokenPicker, decode_tokens
from wina_cli.text_stream import TextStream


def draws(sampling: Sampling, logits: np.ndarray, n: int) -> np.ndarray:
    pick = TokenPicker(sampling)
    return np.array([pick(logits) for _ in range(n)])


def test_greedy_is_the_argmax():
    logits = np.array([0.1, 2.0, -1.0, 1.9], np.float32)
    assert TokenPicker()(logits) == 1
    assert set(draws(Sampling(temperature=5.0, top_k=1, seed=3), logits, 50)) == {1}  # top-k 1 is greedy too
    assert Sampling(temperature=0.0).describe() == {"greedy": True}


def test_samples_follow_the_softmax():
    p = np.array([0.5, 0.3, 0.2])
    got = np.bincount(draws(Sampling(temperature=1.0, seed=1), np.log(p), 6000), minlength=3) / 6000
    assert np.abs(got - p).max() < 0.03, got
    # temperature sharpens (below 1) and flattens (above 1) the same distribution
    cold = np.mean(draws(Sampling(temperature=0.3, seed=1), np.log(p), 2000) == 0)
    hot = np.mean(draws(Sampling(temperature=3.0, seed=1), np.log(p), 2000) == 0)
    assert cold > 0.75 and hot < 0.42, (cold, hot)


def test_the_same_seed_gives_the_same_tokens_and_another_seed_others():
    logits = np.zeros(50)  # flat: every token equally likely
    a = draws(Sampling(temperature=1.0, seed=7), logits, 40)
    assert (a == draws(Sampling(temperature=1.0, seed=7), logits, 40)).all()
    assert (a != draws(Sampling(temperature=1.0, seed=8), logits, 40)).any()


def test_top_k_and_top_p_keep_only_their_candidates():
    logits = np.array([3.0, 2.5, 2.0, 1.0, 0.5, -1.0])
    got = set(draws(Sampling(temperature=1.0, top_k=3, seed=0), logits, 500))
    assert got == {0, 1, 2}
    p = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    # the smallest prefix whose mass reaches p: the first two for 0.6 and 0.79, the first three past 0.8
    assert set(draws(Sampling(temperature=1.0, top_p=0.6, seed=0), p, 500)) == {0, 1}
    assert set(draws(Sampling(temperature=1.0, top_p=0.79, seed=0), p, 500)) == {0, 1}
    assert set(draws(Sampling(temperature=1.0, top_p=0.81, seed=0), p, 2000)) == {0, 1, 2}
    # a tie at the cut is broken by token id, whatever order the candidates came in
    assert set(draws(Sampling(temperature=1.0, top_k=2, seed=0), np.array([1.0, 5.0, 5.0, 5.0]), 300)) == {1, 2}


@pytest.mark.parametrize("bad, word", [(dict(temperature=-0.5), "--temperature"),
                                       (dict(temperature=float("nan")), "--temperature"),
                                       (dict(top_k=-1), "--top-k"), (dict(top_p=0.0), "--top-p"),
                                       (dict(top_p=1.5), "--top-p")])
def test_bad_settings_are_config_errors(bad, word):
    with pytest.raises(ConfigError) as e:
        Sampling(**bad).check()
    assert word in str(e.value) and e.value.exit_code == 3


def test_the_loop_stops_at_the_limit_or_after_the_end_token():
    seen = []
    fed = []

    def step(tok):
        fed.append(tok)
        z = np.zeros(10)
        z[(tok + 1) % 10] = 1.0  # the next token is always the fed one plus 1
        return z

    first = np.eye(10)[4]
    out = decode_tokens(first, step, 5, TokenPicker(), on_token=lambda t: seen.append(list(t)))
    assert out == [4, 5, 6, 7, 8] and fed == [4, 5, 6, 7]
    assert seen == [[4], [4, 5], [4, 5, 6], [4, 5, 6, 7], [4, 5, 6, 7, 8]]
    fed.clear()
    assert decode_tokens(first, step, 20, TokenPicker(), eos=6) == [4, 5, 6] and fed == [4, 5]
    assert decode_tokens(first, step, 1, TokenPicker()) == [4]


def test_chat_prompts_use_the_template_or_fail_clearly(tmp_path):
    from wina_cli.cli import _prompt_ids

    tok = copy.deepcopy(tiny_tokenizer())  # the fixture's tokenizer is shared: the template below must not leak
    assert _prompt_ids(tok, "river stone", False, tmp_path) == list(tok("river stone").input_ids)
    with pytest.raises(ConfigError) as e:
        _prompt_ids(tok, "river stone", True, tmp_path)
    assert "no chat template" in str(e.value)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    ids = _prompt_ids(tok, "river stone", True, tmp_path)
    assert tok.decode(ids) == "<user>river stone<assistant>"


def test_the_stream_writes_the_completion_as_decoded_at_once_from_short_windows():
    tok = copy.deepcopy(tiny_tokenizer())
    # multi-byte characters split over byte-level tokens: the stream must hold them back until complete
    text = "naïve café — 日本語 ✓ " + make_text(60, 5) + " ünïcödé ☃☃ end"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) > 150 and tok.decode(ids) == text
    windows, decode = [], tok.decode

    def counting_decode(t, **kw):
        windows.append(len(t))
        return decode(t, **kw)

    tok.decode = counting_decode
    chunks = []
    stream = TextStream(tok, "PROMPT:", write=chunks.append)
    for n in range(1, len(ids) + 1):
        stream(ids[:n])
    stream.finish(decode(ids, skip_special_tokens=True))
    assert "".join(chunks) == "PROMPT:" + text + "\n"
    assert not any("\ufffd" in c for c in chunks)
    assert len(chunks) > 50  # it streamed, not only at the end
    # each call decoded a window of the last few tokens, not the completion so far
    assert max(windows) <= 8, max(windows)
