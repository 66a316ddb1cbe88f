"""Shared state behind narrow protocols: the spend book and its holds, breakers, rate-limit blocks
and the response cache, in this process (`state.backend: local`, the default) or on Redis
(`redis`), shared by every replica and worker. The pure rules stay in `proxy.core`."""
