"""Incremental detokenization with stop strings: token ids in, always-valid text deltas out.

Decoding one token at a time is wrong for byte-level BPE (a character's bytes can span tokens)
and for tokenizers whose pieces merge with their neighbours. As in vLLM/TGI, the text is decoded
over a small window: `decode(ids[prefix_offset:])` minus `decode(ids[prefix_offset:read_offset])`
is the new text, released only when it does not end in U+FFFD (an incomplete character). The
window starts with the last few prompt tokens so the first output token decodes in context.

Stop strings: released text never contains the start of a possible stop string. The longest
suffix of the pending text that is a prefix of some stop string is held back; once a stop string
appears, the text before it is released and the stream stops (the stop string is never emitted).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_CONTEXT_TOKENS = 5  # prompt tokens decoded along with the first output tokens
_INCOMPLETE = "\ufffd"


class Detokenizer:
    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], stop: tuple[str, ...]
    ) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])  # context + outputs so far
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.stop = tuple(s for s in stop if s)
        self.pending = ""  # decoded, not yet released (could start a stop string)
        self.stopped = False  # a stop string was found; nothing more is released

    def push(self, token_id: int) -> str:
        """Add one output token; return the text that is safe to release now (maybe "")."""
        self.ids.append(token_id)
        if self.stopped:
            return ""
        return self._release(self._decode_new())

    def flush(self) -> str:
        """At the end: everything still held (an unfinished character decodes as U+FFFD)."""
        if self.stopped:
            return ""
        text = self.pending + self._decode_rest()
        self.pending = ""
        return text

    def _decode_new(self) -> str:
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith(_INCOMPLETE):
            return ""  # nothing yet, or an incomplete character: wait for more tokens
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]

    def _decode_rest(self) -> str:
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return after[len(before) :]

    def _release(self, new: str) -> str:
        if not new:
            return ""
        self.pending += new
        if not self.stop:
            text, self.pending = self.pending, ""
            return text
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            text, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return text
        keep = len(self.pending) - self._held_suffix()
        text, self.pending = self.pending[:keep], self.pending[keep:]
        return text

    def _held_suffix(self) -> int:
        """Length of the longest suffix of the pending text that starts some stop string."""
        best = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _decode(self, ids: list[int]) -> str:
        text = self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        assert isinstance(text, str)
        return text
