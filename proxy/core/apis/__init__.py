"""The client APIs the proxy speaks, one `Api` each (see `proxy.core.apis.base`)."""

from proxy.core.apis.base import Api, Meter
from proxy.core.apis.chat import ChatApi
from proxy.core.apis.completions import CompletionsApi
from proxy.core.apis.embeddings import EmbeddingsApi

CHAT = ChatApi()
APIS: tuple[Api, ...] = (CHAT,)  # every API the proxy serves
APIS += (EmbeddingsApi(), CompletionsApi())

__all__ = ["APIS", "CHAT", "Api", "ChatApi", "Meter"]
