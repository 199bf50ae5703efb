"""Audio sources for paging: µ-law, WAV conversion, raw µ-law, espeak-ng text-to-speech."""

from __future__ import annotations

import array
import itertools
import math
import os
import shutil
import wave
from pathlib import Path

import pytest

from phonepush.audio.clips import (
    SAMPLE_RATE,
    Speech,
    announcement,
    decode_wav,
    level_dbfs,
    load_file,
    pcm16_to_ulaw,
    resample,
    silence,
    ulaw_to_pcm16,
)
from phonepush.errors import AudioError, PhonepushError


def _sine(rate: int, seconds: float, frequency: float, amplitude: float) -> list[int]:
    return [
        round(amplitude * 32767 * math.sin(2 * math.pi * frequency * n / rate))
        for n in range(round(rate * seconds))
    ]


def _write_wav(path: Path, frames: bytes, *, rate: int, width: int, channels: int) -> Path:
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(frames)
    return path


def _zero_crossings(ulaw: bytes) -> int:
    samples = ulaw_to_pcm16(ulaw)
    return sum(1 for a, b in itertools.pairwise(samples) if (a < 0) != (b < 0))


# --- µ-law ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sample", "code"),
    [
        (0, 0xFF),
        (-1, 0x7F),
        (32767, 0x80),
        (-32768, 0x00),
        (32124, 0x80),
        (120, 0xF0),
        (132, 0xEF),
        (-132, 0x6F),
        (8031, 0xA0),
    ],
)
def test_ulaw_encodes_g711_codes(sample: int, code: int) -> None:
    assert pcm16_to_ulaw([sample]) == bytes([code])


@pytest.mark.parametrize(
    ("code", "sample"),
    [(0xFF, 0), (0x7F, 0), (0x80, 32124), (0x00, -32124), (0xF0, 120), (0xEF, 132), (0xA0, 7932)],
)
def test_ulaw_decodes_g711_values(code: int, sample: int) -> None:
    assert list(ulaw_to_pcm16(bytes([code]))) == [sample]


def test_ulaw_round_trip_error_is_within_half_a_quantisation_step() -> None:
    samples = array.array("h", range(-32768, 32768))
    decoded = ulaw_to_pcm16(pcm16_to_ulaw(samples))
    for x, y in zip(samples, decoded, strict=True):
        magnitude = min(abs(x), 32635)
        # Segment e covers magnitudes up to 2**(e+8) - 132 in steps of 2**(e+3).
        segment = max(0, (magnitude + 132).bit_length() - 8)
        bound = 2 ** (segment + 2) + (abs(x) - magnitude)  # half a step, plus what clipping cut
        assert abs(x - y) <= bound, (x, y)


def test_ulaw_is_monotonic_and_symmetric() -> None:
    codes = pcm16_to_ulaw(range(-32768, 32768, 7))
    decoded = list(ulaw_to_pcm16(codes))
    assert decoded == sorted(decoded)
    positive = ulaw_to_pcm16(pcm16_to_ulaw(range(1, 32768, 13)))
    negative = ulaw_to_pcm16(pcm16_to_ulaw(range(-1, -32768, -13)))
    assert list(negative) == [-v for v in positive]


def test_level_of_a_sine_and_of_silence() -> None:
    half_scale = pcm16_to_ulaw(_sine(8000, 1, 400, 0.5))
    assert level_dbfs(half_scale) == pytest.approx(-9.03, abs=0.3)
    assert level_dbfs(silence(1)) == -math.inf
    assert level_dbfs(b"") == -math.inf


# --- resampling and WAV ---------------------------------------------------------------------


def test_resample_keeps_duration() -> None:
    assert len(resample([0] * 44100, 44100)) == 8000
    assert len(resample([0] * 11025, 22050)) == 4000
    assert len(resample([0] * 4000, 16000)) == 2000
    assert resample([1, 2, 3], 8000) == [1, 2, 3]
    assert len(resample([0] * 4000, 4000)) == 8000


def test_wav_16bit_44k1_stereo(tmp_path: Path) -> None:
    left = _sine(44100, 1.5, 440, 0.5)
    right = _sine(44100, 1.5, 440, 0.5)
    interleaved = array.array("h", [s for pair in zip(left, right, strict=True) for s in pair])
    path = _write_wav(
        tmp_path / "stereo.wav", interleaved.tobytes(), rate=44100, width=2, channels=2
    )
    audio = load_file(path)
    assert len(audio) == 12000  # 1.5 s at 8 kHz
    assert level_dbfs(audio) == pytest.approx(-9.03, abs=0.6)
    # The pitch survives resampling: 440 Hz has 880 zero crossings a second.
    assert _zero_crossings(audio) == pytest.approx(1.5 * 880, rel=0.02)


def test_wav_8bit_22k05_mono(tmp_path: Path) -> None:
    samples = _sine(22050, 1.0, 300, 0.8)
    unsigned = bytes((s >> 8) + 128 for s in samples)
    path = _write_wav(tmp_path / "mono8.wav", unsigned, rate=22050, width=1, channels=1)
    audio = load_file(path)
    assert len(audio) == SAMPLE_RATE
    assert level_dbfs(audio) == pytest.approx(20 * math.log10(0.8) - 3.01, abs=0.6)
    assert _zero_crossings(audio) == pytest.approx(600, rel=0.02)


@pytest.mark.parametrize("width", [3, 4])
def test_wav_24_and_32_bit(tmp_path: Path, width: int) -> None:
    samples = _sine(16000, 0.5, 500, 0.25)
    # Little-endian, the 16-bit sample in the top bytes.
    frames = b"".join(b"\x00" * (width - 2) + s.to_bytes(2, "little", signed=True) for s in samples)
    audio = load_file(
        _write_wav(tmp_path / "wide.wav", frames, rate=16000, width=width, channels=1)
    )
    assert len(audio) == 4000
    assert level_dbfs(audio) == pytest.approx(20 * math.log10(0.25) - 3.01, abs=0.6)


def test_stereo_is_mixed_to_mono(tmp_path: Path) -> None:
    left = _sine(8000, 1, 400, 0.5)
    frames = array.array("h", [s for v in left for s in (v, 0)]).tobytes()
    audio = load_file(_write_wav(tmp_path / "l.wav", frames, rate=8000, width=2, channels=2))
    # One silent channel halves the amplitude: 6 dB down.
    assert level_dbfs(audio) == pytest.approx(-9.03 - 6.02, abs=0.5)


def test_raw_ulaw_passes_through(tmp_path: Path) -> None:
    data = bytes(range(256)) * 10
    path = tmp_path / "tone.ulaw"
    path.write_bytes(data)
    assert load_file(path) == data


def test_unreadable_audio_is_an_audio_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(AudioError, match="not a WAV file"):
        load_file(text)
    with pytest.raises(AudioError, match="Cannot read"):
        load_file(tmp_path / "missing.wav")
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x07\x00")
    with pytest.raises(AudioError, match="PCM"):
        load_file(broken)
    with pytest.raises(PhonepushError):
        decode_wav(b"RIFF junk")


def test_announcement_puts_chime_first_and_repeats_with_gaps() -> None:
    body = b"\x10" * 800
    chime = b"\x20" * 400
    audio = announcement(body, chime=chime, repeat=2, gap_s=0.5)
    assert audio == chime + silence(0.25) + body + silence(0.5) + body
    assert announcement(body) == body
    with pytest.raises(AudioError):
        announcement(body, repeat=0)


# --- text-to-speech -------------------------------------------------------------------------

_ESPEAK = shutil.which("espeak-ng")
needs_espeak = pytest.mark.skipif(
    _ESPEAK is None and not os.environ.get("CI"),
    reason="espeak-ng is not installed (apt-get install espeak-ng); required in CI",
)


@needs_espeak
async def test_speech_renders_audible_audio_of_plausible_length() -> None:
    speech = Speech()
    audio = await speech.render("Evacuate the building")
    seconds = len(audio) / SAMPLE_RATE
    assert 0.8 < seconds < 5.0
    assert level_dbfs(audio) > -35
    # Many distinct sample values: speech, not a constant hum or a click.
    assert len(set(audio)) > 50


@needs_espeak
async def test_speech_is_cached_in_memory_and_on_disk(tmp_path: Path) -> None:
    speech = Speech(cache_dir=tmp_path, cache_entries=1)
    first = await speech.render("Fire drill at noon")
    again = await speech.render("Fire drill at noon")
    assert again == first
    assert speech.renders == 1
    await speech.render("Something else")
    assert speech.renders == 2
    # A new process (a new Speech) finds the render on disk.
    later = Speech(cache_dir=tmp_path)
    assert await later.render("Fire drill at noon") == first
    assert later.renders == 0
    assert len(list(tmp_path.glob("tts-*.ulaw"))) == 2


@needs_espeak
async def test_speech_with_a_missing_voice_says_so() -> None:
    with pytest.raises(AudioError, match="failed"):
        await Speech(voice="nosuchvoice").render("hello")


async def test_speech_without_espeak_ng_is_a_clear_error(tmp_path: Path) -> None:
    speech = Speech(program=str(tmp_path / "espeak-ng"))
    with pytest.raises(AudioError, match="apt-get install espeak-ng"):
        await speech.render("hello")


async def test_speech_refuses_empty_text() -> None:
    with pytest.raises(AudioError, match="empty"):
        await Speech().render("   ")
