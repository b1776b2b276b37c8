"""`tailor chat`: talk to a model in the terminal, its answer streamed as it is generated.

The conversation is kept as messages and rendered by the engine with the run's chat format on every turn,
so the first turn's prompt is exactly what the model saw in training. Commands: /reset clears the history,
/system TEXT sets the system prompt (/system alone goes back to the default), /exit or end of input quits.
"""
from __future__ import annotations

import sys
from typing import Iterator, TextIO

from tailorlm.serve.engine import Engine, PromptError, Sampling

HELP = "Type a message. /reset clears the conversation, /system TEXT sets the system prompt, /exit quits."


class ChatSession:
    """A conversation with one model: its history, its system prompt and its sampling settings."""

    def __init__(self, engine: Engine, sampling: Sampling, system: str | None = None):
        self.engine, self.sampling = engine, sampling
        self.system = system  # None: the run's own system prompt (or the chat template's default)
        self.history: list[dict] = []  # user and assistant turns, in order

    def messages(self, user_text: str | None = None) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        user = [{"role": "user", "content": user_text}] if user_text is not None else []
        return system + self.history + user

    def reply(self, user_text: str) -> Iterator[str]:
        """The assistant's answer in pieces as they are generated; the exchange joins the history at the end."""
        prompt = self._prompt(user_text)
        stream = self.engine.stream(prompt, self.sampling)
        pieces: list[str] = []
        try:
            for piece in stream:
                pieces.append(piece)
                yield piece
        finally:  # also when interrupted: the partial answer is what the user saw, so it is what the model sees
            stream.cancel()
            self.history += [{"role": "user", "content": user_text},
                             {"role": "assistant", "content": "".join(pieces)}]

    def reset(self) -> None:
        self.history = []

    def _prompt(self, user_text: str) -> list[int]:
        # The oldest exchanges go first when the conversation outgrows the context, keeping room to answer.
        while True:
            prompt = self.engine.chat_prompt(self.messages(user_text))
            if len(prompt) + min(self.sampling.max_new_tokens, 16) <= self.engine.context_length or not self.history:
                return prompt
            self.history = self.history[2:]


def run_chat(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """The read-reply loop; returns the exit code. Works on any text streams, so it can be scripted."""
    interactive = stdin.isatty() and stdout.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    stdout.write(HELP + "\n")
    while True:
        line = _read(stdin, stdout, interactive)
        if line is None or line.strip() in ("/exit", "/quit"):
            stdout.write("\n" if line is None else "")
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            session.reset()
            stdout.write("(conversation cleared)\n")
        elif text == "/system" or text.startswith("/system "):
            session.system = text[len("/system"):].strip() or None
            stdout.write(f"(system prompt: {session.system or 'the default'})\n")
        elif text.startswith("/") and not text.startswith("//"):
            stdout.write(f"(unknown command {text.split()[0]}) {HELP}\n")
        else:
            _answer(session, text.removeprefix("/"), stdout)  # '//text' sends a message that starts with '/'


def _read(stdin: TextIO, stdout: TextIO, interactive: bool) -> str | None:
    if interactive:
        try:
            return input("you> ")
        except EOFError:
            return None
    stdout.write("you> ")
    stdout.flush()
    line = stdin.readline()
    return line if line else None


def _answer(session: ChatSession, text: str, stdout: TextIO) -> None:
    stdout.write("model> ")
    try:
        for piece in session.reply(text):
            stdout.write(piece)
            stdout.flush()
    except PromptError as e:
        stdout.write(f"(cannot answer: {e})")
    except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
        stdout.write(" (stopped)")
    stdout.write("\n")
