"""IDM: the inter-domain channel that carries CUDA calls from a zone to gpu-proxy in Dom0.

Public surface:
    idm.channel     Channel (one side of a channel over a Link), RingLayout, Bell, errors
    idm.server      ChannelServer (the host's serve loop: hello, batch receive, dispatch)
    idm.links       LocalLink/LocalListener (same host), GrantLink (Xen grant pages)
    idm.wire        the message header and channel-level opcodes/status codes
    idm.calltable   the call table's model; idm.gen.codec the generated per-call codec
The ring itself is C (idm/csrc), compiled into idm._ring by ``python -m idm.build``.
"""
