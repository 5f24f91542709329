"""The tiny DeepSeek-V3 served: four concurrent greedy completions through the real server and
the official `openai` client (continuous batching, MLA's latent cache per slot) each give
transformers' own greedy continuation of its prompt ids."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

from cluster.server import ServeConfig
from tests.reference.tiny_models import TinyModel, reference_greedy
from tests.server.conftest import RunningServer, running_server

pytestmark = pytest.mark.slow
N_TOKENS = 16
ORDINARY_VOCAB = 151_643  # Qwen2 ids below this are ordinary tokens


@pytest.fixture(scope="module")
def deepseek_server(tiny_deepseek: TinyModel) -> Iterator[RunningServer]:
    config = ServeConfig(model_path=str(tiny_deepseek.gguf["f32"]), max_model_len=128,
                         max_num_seqs=4, threads=2)
    with running_server(config) as server:
        yield server


def test_concurrent_greedy_completions_match_transformers(deepseek_server: RunningServer,
                                                          tiny_deepseek: TinyModel) -> None:
    rng = np.random.default_rng(7)
    prompts = [[int(i) for i in rng.integers(0, ORDINARY_VOCAB, 6 + 3 * n)] for n in range(4)]
    client = openai.OpenAI(base_url=deepseek_server.base_url + "/v1", api_key="unused",
                           max_retries=0)

    def complete(prompt: list[int]) -> str:
        result = client.completions.create(model=deepseek_server.model_name, prompt=prompt,
                                           max_tokens=N_TOKENS, temperature=0)
        return result.choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(complete, prompts))
    tokenizer = deepseek_server.engine.tokenizer
    for prompt, text in zip(prompts, texts, strict=True):
        expected_ids = reference_greedy(tiny_deepseek, prompt, N_TOKENS)
        assert text == tokenizer.decode(expected_ids)
