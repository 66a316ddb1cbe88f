"""The client APIs the proxy speaks, one `Api` each (see `proxy.core.apis.base`)."""

from proxy.core.apis.base import Api, Meter
from proxy.core.apis.chat import ChatApi
from proxy.core.apis.completions import CompletionsApi
from proxy.core.apis.embeddings import EmbeddingsApi
from proxy.core.apis.messages import MessagesApi
from proxy.core.apis.responses import ResponsesApi

CHAT = ChatApi()
# Every API the proxy serves.
APIS: tuple[Api, ...] = (CHAT, ResponsesApi(), MessagesApi(), EmbeddingsApi(), CompletionsApi())

__all__ = ["APIS", "CHAT", "Api", "ChatApi", "Meter"]
