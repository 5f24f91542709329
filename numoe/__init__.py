"""numoe's Python client: the official `openai` package for the OpenAI API, plus what only a numoe
server has (cluster plan, topology, expert load, health), sync and async, retrying on 503.

    import numoe
    client = numoe.Client("http://127.0.0.1:8000")
    print(client.complete("The capital of France is", max_tokens=16).text)
    for piece in client.stream("Once upon a time", max_tokens=32):
        print(piece, end="")
    print(client.plan().predicted_decode_tok_s, client.expert_load()[0].imbalance)
    client.openai.chat.completions.create(...)  # the openai client, configured for this server
"""

from numoe.client import (
    APIError,
    AsyncClient,
    Client,
    Completion,
    ExpertLoad,
    PlanSummary,
    Usage,
    WorkerSummary,
)

__all__ = ["APIError", "AsyncClient", "Client", "Completion", "ExpertLoad", "PlanSummary",
           "Usage", "WorkerSummary"]
