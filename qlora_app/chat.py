"""`qlora-app chat`: a terminal chat with a running OpenAI-compatible server (ours, on a pod reached by SSH).

Tokens are printed as they stream in; the conversation is kept and sent whole each turn. Ctrl-C stops the
reply being written (what arrived stays in the history) and gives the prompt back; Ctrl-D or /exit ends the
session, /reset forgets the conversation.
"""

from __future__ import annotations

import sys

from qlora_app.errors import UserError

PROMPT = "you> "
HELP = "Type a message. Ctrl-C stops a reply, /reset forgets the conversation, /exit or Ctrl-D ends."


def api_base(url: str) -> str:
    """The OpenAI API's base for a server's address, given with or without its /v1."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def connect(url: str, api_key: str | None):
    from openai import OpenAI

    return OpenAI(base_url=api_base(url), api_key=api_key or "not-needed", max_retries=0, timeout=600)


def pick_model(client, url: str, model: str | None) -> str:
    import openai

    try:
        served = [m.id for m in client.models.list().data]
    except openai.AuthenticationError:
        raise UserError(f"the server at {url} wants an API key: export QLORA_API_KEY=<its key>") from None
    except openai.APIConnectionError:
        raise UserError(f"no server answers at {url}: start one with qlora-app serve, or give --url") from None
    except openai.APIStatusError as exc:
        raise UserError(f"the server at {url} answered {exc.status_code} to {exc.request.url}: "
                        f"{str(exc).splitlines()[0]}") from None
    if model is None and len(served) != 1:
        raise UserError(f"the server at {url} serves {', '.join(served) or 'no model'}: choose one with --model")
    if model is not None and model not in served:
        raise UserError(f"the server at {url} does not serve '{model}' (it serves {', '.join(served)})")
    return model or served[0]


def stream_reply(client, model: str, history: list[dict], write=sys.stdout.write,
                 temperature: float | None = None) -> str:
    """Print the reply as it streams in and return it; Ctrl-C ends it early."""
    text, stream = [], None
    sampling = {} if temperature is None else {"temperature": temperature}
    try:
        stream = client.chat.completions.create(model=model, messages=history, stream=True, **sampling)
        for chunk in stream:
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece:
                text.append(piece)
                write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:
        write(" [stopped]")
    finally:
        if stream is not None:
            stream.close()
        write("\n")
    return "".join(text)


def read_line() -> str | None:
    """The next message; None at end of input. Ctrl-C at the prompt gives a fresh prompt."""
    while True:
        try:
            return input(PROMPT)
        except EOFError:
            sys.stdout.write("\n")
            return None
        except KeyboardInterrupt:
            sys.stdout.write("\n")


def chat(url: str, model: str | None, api_key: str | None, temperature: float | None = None) -> None:
    import readline  # noqa: F401  (line editing and history for input())

    import openai

    from qlora_app import console

    client = connect(url, api_key)
    model = pick_model(client, url, model)
    print(f"chatting with {model} at {url}. {HELP}")
    history: list[dict] = []
    while (line := read_line()) is not None:
        command = line.strip()
        if command == "/exit":
            break
        if command == "/reset":
            history.clear()
            print("(conversation cleared)")
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line})
        try:
            history.append({"role": "assistant", "content": stream_reply(client, model, history,
                                                                          temperature=temperature)})
        except openai.APIError as exc:
            history.pop()
            console.error(f"the server refused that message: {str(exc).splitlines()[0]}")
