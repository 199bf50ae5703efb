"""Audio for paging: everything ends as G.711 µ-law, 8 kHz, mono — what a Cisco phone plays from
an ``RTPRx:``/``RTPMRx:`` stream (see :mod:`phonepush.audio.rtp`).

Sources:

* **WAV** (:func:`load_wav`, :func:`decode_wav`): PCM 8-bit (unsigned), 16-, 24- or 32-bit
  (signed), any sample rate, any number of channels, read with the standard ``wave`` module.
  Channels are averaged to mono, samples cut to 16 bits, then resampled to 8 kHz and encoded.
  ``wave`` on Python 3.11 refuses ``WAVE_FORMAT_EXTENSIBLE`` headers (3.12 reads them) and any
  compressed format (µ-law WAV, float, ADPCM): those are an :class:`~phonepush.errors.AudioError`
  naming the problem; convert with e.g. ``sox in.wav -b 16 out.wav``.
* **Raw µ-law** (``.ulaw``, ``.ul``, ``.mulaw``, ``.raw``, ``.pcmu``; 8 kHz assumed) passes
  through untouched — the format of phone ring tones, so a tone made for ``setRingTone`` works.
* **Text-to-speech** (:class:`Speech`) through the ``espeak-ng`` program (Debian package
  ``espeak-ng``; an optional system dependency). Text goes to its stdin, never through a shell
  and never as an argument (so text starting with ``-`` is just text); SSML is off, so event
  text cannot steer the synthesiser. Rendered audio is kept in a bounded in-memory LRU keyed by
  (text, voice, speed) and, with ``cache_dir``, on disk.

Choices:

* **µ-law encoding** is G.711's (bias 0x84, clip 32635, the sign bit and all bits inverted), done
  through a 65,536-entry table built once at import (≈30 ms) and indexed by the 16-bit sample's
  two's-complement bit pattern. ``audioop`` (gone in Python 3.13) is not used; negative samples
  are encoded symmetrically to positive ones, so a few values near segment edges differ by one
  step from ``audioop``'s (which floors before it negates).
* **Resampling** is linear interpolation. Downsampling (e.g. 44.1 kHz → 8 kHz) first runs a
  moving average as wide as the rate ratio, a crude low-pass that keeps most of the aliasing of
  high frequencies out of the telephone band; good enough for speech and chimes, not for music.
* **Cost.** Conversion is pure Python: a minute of 44.1 kHz stereo takes about 2 s of CPU, so
  load files once (when the config is loaded) and keep the µ-law; raw µ-law costs nothing.
* **Loudness is left alone**: the phone's volume comes from the ``RTPRx`` URI (0–100).
* **Announcements** (:func:`announcement`): optional chime once, then the message ``repeat``
  times with ``gap_s`` of silence between repeats.

Public API for the daemon (rule action ``audio = {...}``)::

    speech = Speech(cache_dir=state_dir / "tts")        # one per daemon; keeps the cache
    body = await speech.render(text)                     # µ-law bytes; AudioError if espeak-ng
    body = await asyncio.to_thread(load_file, path)     # WAV or raw µ-law file
    audio = announcement(body, chime=chime, repeat=2)   # what phonepush.audio.paging.page() streams
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import hashlib
import io
import math
import os
import sys
import tempfile
import wave
from collections.abc import Sequence
from itertools import accumulate
from pathlib import Path
from typing import Final

from phonepush.errors import AudioError

__all__ = [
    "RAW_SUFFIXES",
    "SAMPLE_RATE",
    "ULAW_SILENCE",
    "Speech",
    "announcement",
    "decode_wav",
    "energy",
    "level_dbfs",
    "load_file",
    "load_wav",
    "pcm16_to_ulaw",
    "resample",
    "silence",
    "ulaw_to_pcm16",
]

SAMPLE_RATE: Final = 8000
#: µ-law of a zero sample; what a phone plays as silence.
ULAW_SILENCE: Final = 0xFF
#: File suffixes read as raw µ-law, 8 kHz.
RAW_SUFFIXES: Final = frozenset({".ulaw", ".ul", ".mulaw", ".raw", ".pcmu"})
#: Files bigger than this are refused: 50 MB of 16-bit 44.1 kHz stereo is ~5 minutes.
MAX_FILE_BYTES: Final = 50 * 1024 * 1024
#: Text longer than this is refused by :class:`Speech` (about two minutes of speech).
MAX_TEXT_CHARS: Final = 2000
ESPEAK: Final = "espeak-ng"

_BIAS: Final = 0x84
_CLIP: Final = 32635


def _encode_sample(sample: int) -> int:
    sign = 0
    if sample < 0:
        sample, sign = -sample, 0x80
    sample = min(sample, _CLIP) + _BIAS
    exponent = sample.bit_length() - 8
    mantissa = (sample >> (exponent + 3)) & 0x0F
    return ~(sign | (exponent << 4) | mantissa) & 0xFF


def _decode_byte(byte: int) -> int:
    byte = ~byte & 0xFF
    exponent = (byte >> 4) & 0x07
    sample = (((byte & 0x0F) << 3) + _BIAS) << exponent
    sample -= _BIAS
    return -sample if byte & 0x80 else sample


# Indexed by a 16-bit sample's unsigned bit pattern (array 'H' over the same bytes as 'h').
_ENCODE: Final = bytes(_encode_sample(i - 65536 if i >= 32768 else i) for i in range(65536))
_DECODE: Final = tuple(_decode_byte(b) for b in range(256))
_SQUARES: Final = tuple(v * v for v in _DECODE)
_XOR_80: Final = bytes(b ^ 0x80 for b in range(256))
_BIG_ENDIAN: Final = sys.byteorder == "big"


def pcm16_to_ulaw(samples: array.array[int] | Sequence[int]) -> bytes:
    """Encode signed 16-bit samples (an ``array('h')`` or ints in -32768..32767) as µ-law."""
    if isinstance(samples, array.array) and samples.typecode == "h":
        raw = samples.tobytes()
    else:
        raw = array.array("h", samples).tobytes()
    return bytes(map(_ENCODE.__getitem__, array.array("H", raw)))


def ulaw_to_pcm16(data: bytes) -> array.array[int]:
    """Decode µ-law bytes to signed 16-bit samples."""
    return array.array("h", map(_DECODE.__getitem__, data))


def energy(data: bytes) -> int:
    """The sum of the squared 16-bit values of µ-law samples (for running level measurements)."""
    return sum(map(_SQUARES.__getitem__, data))


def level_dbfs(data: bytes) -> float:
    """RMS level of µ-law audio in dB relative to full scale (0 dBFS: every sample at ±32768, a
    full-scale square wave; a full-scale sine is about -3 dBFS); ``-inf`` for silence."""
    if not data:
        return -math.inf
    mean_square = energy(data) / len(data)
    if mean_square == 0:
        return -math.inf
    return 10 * math.log10(mean_square / 32768**2)


def silence(seconds: float) -> bytes:
    """µ-law silence, rounded to whole samples."""
    return bytes([ULAW_SILENCE]) * max(0, round(seconds * SAMPLE_RATE))


def _to_int16(frames: bytes, width: int) -> array.array[int]:
    """Little-endian PCM of ``width`` bytes per sample -> 16-bit samples (top 16 bits kept)."""
    if width == 2:
        out = bytearray(frames)
    else:
        count = len(frames) // width
        out = bytearray(count * 2)
        if width == 1:
            # 8-bit WAV is unsigned: flipping the top bit makes it signed, and it is the high byte.
            out[1::2] = frames.translate(_XOR_80)
        else:
            out[0::2] = frames[width - 2 :: width]
            out[1::2] = frames[width - 1 :: width]
    samples = array.array("h", bytes(out))
    if _BIG_ENDIAN:
        samples.byteswap()
    return samples


def _mix_to_mono(samples: array.array[int], channels: int) -> list[int]:
    if channels == 1:
        return list(samples)
    lanes = [samples[k::channels] for k in range(channels)]
    # Floor division keeps the sum of full-scale channels inside 16 bits.
    return [sum(frame) // channels for frame in zip(*lanes, strict=False)]


def resample(samples: Sequence[int], rate: int, target: int = SAMPLE_RATE) -> list[int]:
    """Linear-interpolation resampling of 16-bit samples from ``rate`` to ``target`` Hz.

    Downsampling first smooths with a moving average as wide as ``rate / target`` (a cheap
    low-pass against aliasing). The result has ``round(len * target / rate)`` samples.
    """
    if rate <= 0 or target <= 0:
        raise AudioError(f"invalid sample rate {rate} Hz")
    count = len(samples)
    if rate == target or count == 0:
        return list(samples)
    width = int(rate // target)
    if width >= 2:
        # Only the samples interpolation reads are averaged: two per output sample.
        sums = [0, *accumulate(samples)]
        before, after = width // 2, width - width // 2

        def value(i: int) -> float:
            low, high = max(0, i - before), min(count, i + after)
            return (sums[high] - sums[low]) / (high - low)
    else:

        def value(i: int) -> float:
            return samples[i]

    length = round(count * target / rate)
    step = rate / target
    last = count - 1
    out: list[int] = []
    append = out.append
    for n in range(length):
        position = n * step
        index = int(position)
        if index >= last:
            append(round(value(last)))
            continue
        a = value(index)
        append(round(a + (value(index + 1) - a) * (position - index)))
    return out


def decode_wav(data: bytes, *, name: str = "WAV data") -> bytes:
    """Convert a WAV file's bytes to µ-law 8 kHz mono. Raises :class:`AudioError`."""
    try:
        with wave.open(io.BytesIO(data), "rb") as reader:
            channels = reader.getnchannels()
            width = reader.getsampwidth()
            rate = reader.getframerate()
            # The frame count in the header is not trusted: streamed WAVs (espeak-ng --stdout)
            # carry a placeholder near 2**30; reading stops at the end of the data anyway.
            frames = reader.readframes(reader.getnframes())
    except (wave.Error, EOFError) as exc:
        raise AudioError(
            f"{name}: not a PCM WAV file we can read ({exc}); "
            "8/16/24/32-bit PCM only — convert with e.g. 'sox IN -b 16 OUT.wav'"
        ) from exc
    if width not in (1, 2, 3, 4):
        raise AudioError(f"{name}: {width * 8}-bit samples are not supported")
    if channels < 1 or rate <= 0:
        raise AudioError(f"{name}: invalid WAV header ({channels} channels, {rate} Hz)")
    frames = frames[: len(frames) - len(frames) % (width * channels)]
    mono = _mix_to_mono(_to_int16(frames, width), channels)
    return pcm16_to_ulaw(resample(mono, rate))


def load_wav(path: str | os.PathLike[str]) -> bytes:
    """Read a WAV file and convert it to µ-law 8 kHz mono (blocking: use ``asyncio.to_thread``
    from async code). Raises :class:`AudioError`."""
    return decode_wav(_read(Path(path)), name=str(path))


def load_file(path: str | os.PathLike[str]) -> bytes:
    """Read an audio file as µ-law 8 kHz: a WAV (sniffed by its RIFF/WAVE header, whatever the
    name) or raw µ-law (by suffix, see :data:`RAW_SUFFIXES`). Blocking. Raises
    :class:`AudioError` for anything else."""
    file = Path(path)
    data = _read(file)
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return decode_wav(data, name=str(file))
    if file.suffix.lower() in RAW_SUFFIXES:
        return data
    raise AudioError(
        f"{file}: not a WAV file, and not raw µ-law by its name ({', '.join(sorted(RAW_SUFFIXES))})"
    )


def _read(file: Path) -> bytes:
    try:
        with file.open("rb") as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise AudioError(f"Cannot read {file}: {exc.strerror or exc}") from exc
    if len(data) > MAX_FILE_BYTES:
        raise AudioError(f"{file}: larger than {MAX_FILE_BYTES // (1024 * 1024)} MB")
    if not data:
        raise AudioError(f"{file}: empty file")
    return data


def announcement(
    body: bytes, *, chime: bytes | None = None, repeat: int = 1, gap_s: float = 1.0
) -> bytes:
    """What a page plays: ``chime`` (once, then ``gap_s / 2`` of silence), then ``body``
    ``repeat`` times with ``gap_s`` of silence between repeats."""
    if repeat < 1:
        raise AudioError(f"repeat must be at least 1, not {repeat}")
    gap = silence(gap_s)
    parts: list[bytes] = []
    if chime:
        parts += [chime, silence(gap_s / 2)]
    for n in range(repeat):
        if n:
            parts.append(gap)
        parts.append(body)
    return b"".join(parts)


class Speech:
    """Text-to-speech through ``espeak-ng``, rendered to µ-law 8 kHz and cached.

    ``voice`` and ``speed`` (words per minute, espeak-ng's ``-s``; ``None``: its default, 175)
    are defaults for :meth:`render`. The in-memory cache holds up to ``cache_entries`` renders
    (least recently used dropped first); with ``cache_dir`` renders are also stored as files
    named by a hash of (text, voice, speed), written atomically, and read back by later
    processes. ``program`` is the executable (a path or a name looked up on ``PATH``).
    """

    def __init__(
        self,
        *,
        voice: str = "en",
        speed: int | None = None,
        program: str = ESPEAK,
        cache_entries: int = 64,
        cache_dir: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        if cache_entries < 0:
            raise ValueError("cache_entries must be >= 0")
        self.voice = voice
        self.speed = speed
        self.program = program
        self.timeout = timeout
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._entries = cache_entries
        self._cache: collections.OrderedDict[tuple[str, str, int | None], bytes] = (
            collections.OrderedDict()
        )
        #: Renders done by running espeak-ng (not served from a cache); for tests and metrics.
        self.renders = 0

    async def render(
        self, text: str, *, voice: str | None = None, speed: int | None = None
    ) -> bytes:
        """Speak ``text``; return µ-law 8 kHz mono. Raises :class:`AudioError` when espeak-ng is
        missing, fails, times out, or produces no audio."""
        text = text.strip()
        if not text:
            raise AudioError("nothing to say: the text is empty")
        if len(text) > MAX_TEXT_CHARS:
            raise AudioError(f"text longer than {MAX_TEXT_CHARS} characters")
        key = (text, voice or self.voice, speed if speed is not None else self.speed)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        audio = self._disk_get(key)
        if audio is None:
            audio = await self._synthesize(*key)
            self.renders += 1
            self._disk_put(key, audio)
        self._remember(key, audio)
        return audio

    def _remember(self, key: tuple[str, str, int | None], audio: bytes) -> None:
        if self._entries == 0:
            return
        self._cache[key] = audio
        self._cache.move_to_end(key)
        while len(self._cache) > self._entries:
            self._cache.popitem(last=False)

    def _disk_path(self, key: tuple[str, str, int | None]) -> Path | None:
        if self.cache_dir is None:
            return None
        text, voice, speed = key
        digest = hashlib.sha256(f"{voice}\0{speed}\0{text}".encode()).hexdigest()
        return self.cache_dir / f"tts-{digest[:32]}.ulaw"

    def _disk_get(self, key: tuple[str, str, int | None]) -> bytes | None:
        path = self._disk_path(key)
        if path is None:
            return None
        try:
            return path.read_bytes() or None
        except OSError:
            return None

    def _disk_put(self, key: tuple[str, str, int | None], audio: bytes) -> None:
        path = self._disk_path(key)
        if path is None:
            return
        # The disk cache is an optimisation: failing to write it must not fail the page.
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            try:
                with os.fdopen(handle, "wb") as stream:
                    stream.write(audio)
                os.replace(temporary, path)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise

    async def _synthesize(self, text: str, voice: str, speed: int | None) -> bytes:
        arguments = ["--stdout", "--stdin", "-v", voice]
        if speed is not None:
            arguments += ["-s", str(speed)]
        try:
            process = await asyncio.create_subprocess_exec(
                self.program,
                *arguments,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError as exc:
            raise AudioError(
                f"Text-to-speech needs {self.program}, which is not installed: install the "
                "Debian package espeak-ng (apt-get install espeak-ng), or play a WAV file instead"
            ) from exc
        except OSError as exc:
            raise AudioError(f"Cannot run {self.program}: {exc.strerror or exc}") from exc
        try:
            async with asyncio.timeout(self.timeout):
                out, err = await process.communicate(text.encode("utf-8"))
        except TimeoutError as exc:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise AudioError(f"{self.program} took longer than {self.timeout:g} s") from exc
        if process.returncode != 0:
            message = err.decode("utf-8", "replace").strip().splitlines()
            raise AudioError(
                f"{self.program} failed (exit {process.returncode})"
                + (f": {message[-1]}" if message else "")
            )
        audio = decode_wav(out, name=f"{self.program} output")
        if not audio:
            raise AudioError(f"{self.program} produced no audio for voice {voice!r}")
        return audio
