"""Training corpus recipe: real recorded speech from Debian packages -> 16 kHz mono WAV files plus manifests.

    python -m training.corpus --out data/corpus [--sources asterisk klettres ...] [--install]

Every source is a Debian package set that installs on the training machine (docs/corpus.md has the table,
licences and the splits). Each file is decoded (ffmpeg for raw G.722 only, soundfile otherwise; members of
game archives are read in place), mixed down to mono, resampled to 16 kHz with soxr, stripped of long
leading/trailing silence, dropped when shorter than 0.3 s and cut (at the quietest point) when longer than
30 s (the out-of-domain dev set keeps 1-15 s pieces). Output:

    OUT/wav/<speaker>/<name>.wav        16 kHz mono 16-bit PCM
    OUT/manifest.csv                    path,speaker,duration,split,source,language,kind (path relative to OUT)
    OUT/train.csv, OUT/dev.csv          the same rows, by split
    OUT/dev-ood.csv                     the out-of-domain dev set: voices and kinds of speech unlike the rest

The splits hold out whole voices: all speaker ids of one person (`Item.group`) share a split.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Collection, Mapping, Sequence

import numpy as np
import soundfile as sf
import soxr

from codec.audio import to_pcm16
from codec.errors import AudioError
from codec.manifest import ManifestRow, write_manifest

SAMPLE_RATE = 16000
MIN_SECONDS = 0.3
MAX_SECONDS = 30.0
SPLITS = ("train", "dev", "dev-ood")
# (shortest, longest) piece in seconds per split: the out-of-domain set keeps utterances a listener can judge
SPLIT_SECONDS = {"train": (MIN_SECONDS, MAX_SECONDS), "dev": (MIN_SECONDS, MAX_SECONDS), "dev-ood": (1.0, 15.0)}


# --- signal processing ------------------------------------------------------------------------------
def to_mono(wav: np.ndarray) -> np.ndarray:
    """`[T]` or `[T, C]` (soundfile layout) -> float32 `[T]`, the mean of the channels."""
    wav = np.asarray(wav, dtype=np.float32)
    return wav.mean(axis=1) if wav.ndim == 2 else wav


def resample(wav: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 `[T]` at `rate` -> `[T * target / rate]` at `target` (soxr, very high quality)."""
    if rate == target:
        return wav
    return soxr.resample(wav, rate, target, quality="VHQ").astype(np.float32)


def frame_energy_db(wav: np.ndarray, frame: int) -> np.ndarray:
    """Mean-square energy in dBFS of consecutive `frame`-sample frames of `[T]` (last partial frame padded)."""
    n = max(1, -(-len(wav) // frame))
    padded = np.zeros(n * frame, dtype=np.float64)
    padded[: len(wav)] = wav
    return 10 * np.log10(np.mean(padded.reshape(n, frame) ** 2, axis=1) + 1e-12)


def trim_silence(
    wav: np.ndarray, rate: int = SAMPLE_RATE, rel_db: float = 40.0, floor_db: float = -60.0, margin: float = 0.1
) -> np.ndarray:
    """Cut leading/trailing silence longer than `margin` seconds.

    A 10 ms frame is silent when its energy is at most `rel_db` below the loudest frame's, or at most
    `floor_db` dBFS. An all-silent input returns an empty array."""
    frame = max(1, rate // 100)
    energy = frame_energy_db(wav, frame)
    threshold = max(energy.max() - rel_db, floor_db)
    loud = np.flatnonzero(energy > threshold)
    if len(loud) == 0:
        return wav[:0]
    keep = int(round(margin * rate))
    start = max(0, loud[0] * frame - keep)
    end = min(len(wav), (loud[-1] + 1) * frame + keep)
    return wav[start:end]


def split_long(wav: np.ndarray, rate: int = SAMPLE_RATE, max_seconds: float = MAX_SECONDS) -> list[np.ndarray]:
    """Cut `[T]` into pieces of at most `max_seconds`, each cut at the quietest 10 ms frame of the last
    5 s (or half) of the allowed span, so words are rarely cut. Pieces cover the input exactly, in order."""
    limit = int(max_seconds * rate)
    if len(wav) <= limit:
        return [wav]
    frame = max(1, rate // 100)
    window = min(5 * rate, limit // 2)
    pieces, pos = [], 0
    while len(wav) - pos > limit:
        lo = pos + limit - window
        energy = frame_energy_db(wav[lo : pos + limit], frame)
        quietest = int(np.argmin(energy[: window // frame]))  # whole frames only, so the cut stays <= limit
        cut = lo + quietest * frame + frame // 2
        pieces.append(wav[pos:cut])
        pos = cut
    pieces.append(wav[pos:])
    return pieces


# --- sources ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One unit of work: source file(s) that become one output name (several files are concatenated).

    Args:
        src: file paths, or for the `espeak` decoder `(voice, text)`; a member of an archive is
            `ARCHIVE::MEMBER` (decoders `zip` and `queen`).
        speaker: stable speaker id (`source-language-voice`), the output folder name.
        group: the person behind the voice; speakers of one group always share a split.
        source: source name (a key of `SOURCES`).
        language: BCP 47 tag such as `en-US`.
        name: output file stem, unique within the speaker.
        decoder: `soundfile`, `g722` (ffmpeg), `espeak` (espeak-ng), `zip` (a sound file inside a zip
            archive), `queen` (an MP3 inside Flight of the Amazon Queen's `queen.1c`) or `als` (Drascula's
            unsigned 8-bit mono at `ALS_RATE`).
        min_rate: files recorded below this rate (Hz) are dropped: upsampled narrowband is not 16 kHz speech,
            except in sources that are narrowband on purpose (8000 there).
    """

    src: tuple[str, ...]
    speaker: str
    group: str
    source: str
    language: str
    name: str
    decoder: str = "soundfile"
    min_rate: int = SAMPLE_RATE


@dataclass(frozen=True)
class Source:
    """A family of Debian packages with recorded speech.

    Args:
        name: the `--sources` name.
        packages: Debian packages that provide it (any subset may be installed).
        root: where the files are installed.
        find: `root -> [Item]`, enumerating what is installed.
        summary: one line for the source table.
        default: built without `--sources`.
        train_only: synthetic or narrowband: never in the dev splits.
        dev: groups held out for dev, in order of preference.
        min_dev: if fewer of `dev` are installed, more groups of this source are held out (chosen by hash).
        kind: the kind of speech, the manifests' `kind` column: `read` (clean read words, prompts and
            sentences), `acted` (game voices), `acted-nb` (game voices recorded below 16 kHz) or `telephone`.
        ood: groups that form the out-of-domain dev set (`dev-ood`); they are never in train or dev.
        ood_only: every group of the source is out-of-domain dev.
    """

    name: str
    packages: tuple[str, ...]
    root: str
    find: Callable[[Path], list[Item]]
    summary: str
    default: bool = True
    train_only: bool = False
    dev: tuple[str, ...] = ()
    min_dev: int = 0
    kind: str = "read"
    ood: tuple[str, ...] = ()
    ood_only: bool = False

    def is_ood(self, group: str) -> bool:
        return self.ood_only or group in self.ood


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_") or "x"


def _bcp47(code: str) -> str:
    lang, _, region = code.partition("_")
    return f"{lang.lower()}-{region.upper()}" if region and "@" not in region else lang.lower()


def _stem(rel: Path) -> str:
    return "_".join(_slug(part) for part in rel.with_suffix("").parts)


ASTERISK_VOICE = re.compile(r"^(?P<lang>[a-z]{2})_(?P<region>[A-Z]{2})_(?P<gender>[fm])_(?P<voice>\w+)$")
ASTERISK_NON_SPEECH = {"beep", "beeperr", "ascending-2tone", "descending-2tone"}
ASTERISK_RESERVED = {"it_IT_f_Menardi"}  # asterisk-prompt-it-menardi*: reserved for independent evaluation


def find_asterisk(root: Path) -> list[Item]:
    """Asterisk core sounds in G.722: one folder per voice and language, e.g. `fr_CA_f_June`."""
    items = []
    for folder in sorted(p for p in root.glob("*_*_*_*") if p.is_dir()):
        m = ASTERISK_VOICE.match(folder.name)
        if not m or folder.name in ASTERISK_RESERVED:
            continue
        voice = m["voice"].lower()
        speaker = f"asterisk-{m['lang']}-{voice}"
        for f in sorted(folder.rglob("*.g722")):
            rel = f.relative_to(folder)
            if rel.parts[0] == "silence" or f.stem in ASTERISK_NON_SPEECH:
                continue
            lang = f"{m['lang']}-{m['region']}"
            items.append(Item((str(f),), speaker, f"asterisk-{voice}", "asterisk", lang, _stem(rel), "g722"))
    return items


def find_klettres(root: Path) -> list[Item]:
    """KLettres letters and syllables: one voice per language folder (`<lang>/{alpha,syllab}/*.ogg`)."""
    items = []
    for f in sorted(root.glob("*/*/*.ogg")):
        lang = f.parent.parent.name
        speaker = f"klettres-{_slug(lang)}"
        items.append(Item((str(f),), speaker, speaker, "klettres", _bcp47(lang), _stem(f.relative_to(root / lang))))
    return items


KTUBERLING_EXCLUDE = {"nn"}  # CereVoice text-to-speech (the same set's KLettres credits say so), not a recording


def find_ktuberling(root: Path) -> list[Item]:
    """KTuberling spoken object names: one voice per language folder (`sounds/<lang>/*`)."""
    items = []
    for f in sorted(root.glob("*/*")):
        lang = f.parent.name
        if lang in KTUBERLING_EXCLUDE or f.suffix.lower() not in {".ogg", ".wav", ".opus", ".flac"}:
            continue
        speaker = f"ktuberling-{_slug(lang)}"
        items.append(Item((str(f),), speaker, speaker, "ktuberling", _bcp47(lang.split("@")[0]), _slug(f.stem)))
    return items


TUXPAINT_DESC = re.compile(r"_desc(?:_(?P<lang>[A-Za-z]{2,3}(?:_[A-Z]{2})?))?\.(?:ogg|wav)", re.IGNORECASE)


def find_tuxpaint(root: Path) -> list[Item]:
    """Tux Paint stamp descriptions: `<stamp>_desc[_<lang>].ogg`, one speaker id per language."""
    items = []
    for f in sorted(root.rglob("*_desc*")):
        m = TUXPAINT_DESC.search(f.name)
        if not m or not f.is_file():
            continue
        lang = m["lang"] or "en"
        speaker = f"tuxpaint-{_slug(lang)}"
        stem = _stem(f.relative_to(root).with_name(f.name[: m.start()]))
        items.append(Item((str(f),), speaker, speaker, "tuxpaint", _bcp47(lang), stem))
    return items


GCIN_VOICES = {"3": "liu", "5": "chulo"}  # per debian/copyright: 3.ogg Edward Der-Hua Liu, 5.ogg Chu Lo
GCIN_PER_ITEM = 12  # syllables of ~0.35 s: concatenate 12 into one ~5 s utterance


def chunks(files: Sequence[str], size: int) -> list[tuple[str, ...]]:
    """Consecutive runs of `size` files (the last may be shorter): short clips of one voice become one
    utterance (`load_item` joins them with 0.15 s pauses)."""
    return [tuple(files[i : i + size]) for i in range(0, len(files), size)]


def find_gcin(root: Path) -> list[Item]:
    """gcin-voice Mandarin syllables (`<zhuyin>/<voice>.ogg`), concatenated into ~5 s utterances."""
    items = []
    for key, voice in GCIN_VOICES.items():
        speaker = f"gcin-zh-{voice}"
        for i, chunk in enumerate(chunks(sorted(str(f) for f in root.glob(f"*/{key}.ogg")), GCIN_PER_ITEM)):
            items.append(Item(chunk, speaker, speaker, "gcin", "zh-TW", f"{i:04d}"))
    return items


def _sample(files: Sequence[Path], limit: int) -> list[Path]:
    """At most `limit` of `files`, the same ones whatever else is installed (sha1 order of the names), sorted."""
    return sorted(sorted(files, key=lambda f: _hash(f.name))[:limit])


# Asterisk prompt sets recorded at 8 kHz (GSM 06.10), each installing one language folder:
# folder -> (BCP 47 tag, voice) from debian/copyright (Avatar Ltda. / July E. Jiménez; Armelle Desjardins).
TELEPHONE_VOICES = {"es": ("es-CO", "july"), "fr": ("fr-FR", "armelle")}
TELEPHONE_PER_VOICE = 60  # of ~170-185 whole-sentence prompts each: enough minutes, no voice dominates


def find_telephone(root: Path) -> list[Item]:
    """asterisk-prompt-es-co / -fr-armelle: whole-sentence prompts at 8 kHz (`<lang>/*.gsm`; the digits,
    letters and other subfolders are single words). A language folder that is a symlink belongs to the core
    sound sets, not to these packages, and is skipped."""
    items = []
    for folder_name, (lang, voice) in TELEPHONE_VOICES.items():
        folder = root / folder_name
        if folder.is_symlink() or not folder.is_dir():
            continue
        speaker = f"telephone-{lang.split('-')[0]}-{voice}"
        files = [f for f in folder.glob("*.gsm") if f.stem not in ASTERISK_NON_SPEECH]
        for f in _sample(files, TELEPHONE_PER_VOICE):
            items.append(Item((str(f),), speaker, speaker, "telephone", lang, _slug(f.stem), min_rate=8000))
    return items


# codec2-examples' 8 kHz speech: one recording per name (f2400/m2400 are Codec 2 output of forig/morig, all.wav
# joins the others, wia_16kHz is 1 s at 16 kHz). Several are amateur-radio recordings named by call sign.
CODEC2_RECORDINGS = (
    "big_dog",
    "cross",
    "david4",
    "forig",
    "hts1a",
    "hts2a",
    "mmt1",
    "morig",
    "ve9qrp",
    "vk2tpm_004",
    "vk5qi",
)


def find_codec2(root: Path) -> list[Item]:
    """codec2-examples `wav/<name>.wav`: Codec 2's 8 kHz test speech, one speaker id per recording."""
    items = []
    for name in CODEC2_RECORDINGS:
        f = root / f"{name}.wav"
        if f.is_file():
            speaker = f"codec2-en-{_slug(name)}"
            items.append(Item((str(f),), speaker, speaker, "codec2", "en", _slug(name), min_rate=8000))
    return items


def _member(archive: Path, name: str) -> str:
    return f"{archive}::{name}"


# Warzone 2100's voices (base.wz): folder prefix -> (voice, clips joined per utterance). The folders are the
# game's roles; the data does not name the actors, so two roles may share one.
WARZONE_VOICES = {
    "audio/tutorial/": ("tutorial", 1),
    "sequenceaudio/": ("briefing", 1),
    "audio/proxmessages/": ("proximity", 1),
    "audio/memressp/missmesg/": ("console", 3),
    "audio/taunts/taunt1/": ("taunt1", 3),
    "audio/taunts/taunt2/": ("taunt2", 3),
    "audio/taunts/taunt3/": ("taunt3", 3),
}


def find_warzone2100(root: Path) -> list[Item]:
    """warzone2100-data: tutorial, briefings, messages and taunts inside `base.wz` (a zip), mostly 11 kHz."""
    archive = root / "base.wz"
    if not archive.is_file():
        return []
    names = sorted(n for n in _zip(str(archive)).namelist() if n.endswith(".ogg"))
    items = []
    for prefix, (voice, per_item) in WARZONE_VOICES.items():
        speaker = f"warzone2100-en-{voice}"
        members = [_member(archive, n) for n in names if n.startswith(prefix) and "/" not in n[len(prefix) :]]
        for chunk in chunks(members, per_item):
            name = "_".join(_slug(Path(m.split("::")[1]).stem) for m in chunk)
            items.append(Item(chunk, speaker, speaker, "warzone2100", "en", name, "zip", min_rate=8000))
    return items


MEGAGLEST_SPEECH = re.compile(r"^(?P<unit>[a-z_]+?)_(?:ack|select)\d*\.(?:wav|ogg)$")
MEGAGLEST_GLEST = {"commondata", "magic", "tech"}  # the original Glest team's voices; the rest are MegaGlest's
MEGAGLEST_PER_ITEM = 4  # acknowledgements of ~0.9 s: four make one utterance
# units that answer with animal or monster sounds, not speech
MEGAGLEST_NOT_SPEECH = {
    "behemoth",
    "bull",
    "chicken",
    "cow",
    "daemon",
    "dragon",
    "evil_dragon",
    "golem",
    "pig",
    "sheep",
    "thunderbird",
    "wild_sow",
}


def find_megaglest(root: Path) -> list[Item]:
    """megaglest-data unit voices (`*_ack*`, `*_select*`; not the attack and death cries): one speaker id per
    faction and unit, one group per faction, except that the original Glest voices (`commondata` and the
    factions Glest made) form one group."""
    by_voice: dict[tuple[str, str], list[str]] = defaultdict(list)
    files = [*root.glob("factions/*/units/*/sounds/*"), *root.glob("commondata/sounds/*")]
    for f in sorted(files):
        m = MEGAGLEST_SPEECH.match(f.name.lower())
        if not m:
            continue
        faction = f.parts[-5] if f.parts[-4] == "units" else "commondata"
        unit = f.parts[-3] if faction != "commondata" else m["unit"]
        if unit not in MEGAGLEST_NOT_SPEECH:
            by_voice[(faction, unit)].append(str(f))
    items = []
    for (faction, unit), voice_files in sorted(by_voice.items()):
        speaker = f"megaglest-en-{_slug(faction)}-{_slug(unit)}"
        group = "megaglest-glest" if faction in MEGAGLEST_GLEST else f"megaglest-{_slug(faction)}"
        for i, chunk in enumerate(chunks(voice_files, MEGAGLEST_PER_ITEM)):
            items.append(Item(chunk, speaker, group, "megaglest", "en", f"{i:03d}"))
    return items


# Red Eclipse's spoken sounds: folder -> (voice, clips joined per utterance); the player's taunts are short
# and emotional ("damn it", "haha", "nice shot"), the announcer's calls a little longer.
REDECLIPSE_VOICES = {"voice": ("player", 3), "announcer": ("announcer", 2)}


def find_redeclipse(root: Path) -> list[Item]:
    """redeclipse-data `sounds/{voice,announcer}/*.ogg`: one speaker id per folder."""
    items = []
    for folder, (voice, per_item) in REDECLIPSE_VOICES.items():
        speaker = f"redeclipse-en-{voice}"
        for chunk in chunks(sorted(str(f) for f in (root / folder).glob("*.ogg")), per_item):
            name = "_".join(_slug(Path(f).stem) for f in chunk)
            items.append(Item(chunk, speaker, speaker, "redeclipse", "en", name))
    return items


def find_horizons(root: Path) -> list[Item]:
    """Unknown Horizons' spoken messages (`<lang>/<n>/<event>/*.ogg`), one narrator per language."""
    items = []
    for f in sorted(root.glob("*/*/*/*.ogg")):
        lang = f.parts[-4]
        speaker = f"horizons-{_slug(lang)}"
        items.append(Item((str(f),), speaker, speaker, "horizons", _bcp47(lang), _stem(f.relative_to(root / lang))))
    return items


def find_fotaq(root: Path) -> list[Item]:
    """Flight of the Amazon Queen's speech (the `*.SB` entries of `queen.1c`, MP3 at 11 kHz): Joe, the hero
    (names with `J` at position 7), and the rest of the cast under one speaker id."""
    archive = root / "queen.1c"
    if not archive.is_file():
        return []
    items = []
    for name in sorted(n for n in _queen_table(str(archive)) if n.endswith(".SB")):
        speaker = "fotaq-en-joe" if name[6:7] == "J" else "fotaq-en-cast"
        items.append(
            Item(
                (_member(archive, name),),
                speaker,
                speaker,
                "fotaq",
                "en",
                _slug(Path(name).stem),
                "queen",
                min_rate=8000,
            )
        )
    return items


ALS_RATE = 11025  # Drascula's speech: unsigned 8-bit mono, 32 bytes at each end that the engine skips
ALS_PAD = 32
DRASCULA_VOICES = {"": "hacker"}  # a name without a letter prefix is John Hacker, the hero


def find_drascula(root: Path) -> list[Item]:
    """Drascula's speech (`*.ALS`): one speaker id per file-name prefix (`VB12.ALS` -> `vb`)."""
    items = []
    for f in sorted(root.glob("*.ALS")):
        prefix = re.sub(r"\d+$", "", f.stem)
        speaker = f"drascula-en-{DRASCULA_VOICES.get(prefix, _slug(prefix))}"
        items.append(Item((str(f),), speaker, speaker, "drascula", "en", _slug(f.stem), "als", min_rate=8000))
    return items


ESPEAK_TEXT = {
    "en": [
        "The quick brown fox jumps over the lazy dog.",
        "Please leave your message after the tone.",
        "It is seven thirty in the morning and the train is late again.",
        "Would you like a cup of tea?",
    ],
    "fr": [
        "Le petit chat dort sur le canapé du salon.",
        "Veuillez laisser votre message après le signal.",
        "Il fait beau aujourd'hui, allons marcher au bord de la rivière.",
        "Combien coûte ce livre, s'il vous plaît ?",
    ],
    "es": [
        "El perro corre por el parque todas las mañanas.",
        "Por favor, deje su mensaje después de la señal.",
        "Mañana vamos a visitar a mis abuelos en el campo.",
        "¿Dónde está la estación de tren?",
    ],
    "de": [
        "Der Hund schläft vor dem warmen Ofen.",
        "Bitte hinterlassen Sie eine Nachricht nach dem Signalton.",
        "Morgen fahren wir mit dem Fahrrad an den See.",
        "Wie viel kostet diese Zeitung?",
    ],
    "it": [
        "Il gatto dorme sulla sedia della cucina.",
        "Per favore, lasci un messaggio dopo il segnale acustico.",
        "Domani andiamo al mare con tutta la famiglia.",
        "Quanto costa questo biglietto?",
    ],
}
ESPEAK_VARIANTS = ("m1", "m3", "f2", "f4")


def find_espeak(root: Path) -> list[Item]:
    """espeak-ng synthetic speech (opt-in, train only): a few sentences per language and voice variant."""
    if shutil.which("espeak-ng") is None:
        return []
    items = []
    for lang, sentences in ESPEAK_TEXT.items():
        for variant in ESPEAK_VARIANTS:
            speaker = f"espeak-{lang}-{variant}"
            for i, text in enumerate(sentences):
                items.append(Item((f"{lang}+{variant}", text), speaker, speaker, "espeak", lang, f"s{i:02d}", "espeak"))
    return items


SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            "asterisk",
            (*(f"asterisk-core-sounds-{lang}-g722" for lang in ("en", "es", "fr", "it", "ru")), "ffmpeg"),
            "/usr/share/asterisk/sounds",
            find_asterisk,
            "telephone prompts, whole sentences; 4 voices, 5 languages; G.722 16 kHz",
            dev=("asterisk-june", "asterisk-carlo"),
            min_dev=1,
        ),
        Source(
            "klettres",
            ("klettres-data",),
            "/usr/share/klettres",
            find_klettres,
            "letters and syllables; ~20 voices/languages; Ogg Vorbis 44.1 kHz",
            dev=("klettres-he", "klettres-hu", "klettres-cs"),
            min_dev=2,
        ),
        Source(
            "ktuberling",
            ("ktuberling-data",),
            "/usr/share/ktuberling/sounds",
            find_ktuberling,
            "spoken object names; 17 voices/languages; Ogg/WAV 22-44 kHz (8 kHz files dropped)",
            dev=("ktuberling-gl", "ktuberling-sl"),
            min_dev=1,
        ),
        Source(
            "tuxpaint",
            ("tuxpaint-stamps-default",),
            "/usr/share/tuxpaint/stamps",
            find_tuxpaint,
            "spoken stamp descriptions (words, short phrases); 14 languages; Ogg Vorbis 44.1 kHz",
            dev=("tuxpaint-bg",),
            min_dev=1,
        ),
        Source(
            "gcin",
            ("gcin-voice",),
            "/usr/share/gcin-voice/ogg",
            find_gcin,
            "Mandarin syllables with tones; 2 voices; Ogg Vorbis 44.1 kHz",
        ),
        Source(
            "megaglest",
            ("megaglest-data",),
            "/usr/share/games/megaglest/techs/megapack",
            find_megaglest,
            "acted unit voices (acknowledgements); 6 factions; WAV/Ogg 22-48 kHz; Glest's own voices: dev-ood",
            kind="acted",
            ood=("megaglest-glest",),
        ),
        Source(
            "telephone",
            ("asterisk-prompt-es-co", "asterisk-prompt-fr-armelle"),
            "/usr/share/asterisk/sounds",
            find_telephone,
            "telephone prompts at 8 kHz (GSM); 2 voices, es-CO and fr-FR; dev-ood",
            kind="telephone",
            ood_only=True,
        ),
        Source(
            "codec2",
            ("codec2-examples",),
            "/usr/share/codec2/wav",
            find_codec2,
            "Codec 2's 8 kHz test speech, 11 recordings (some over amateur radio); dev-ood",
            kind="telephone",
            ood_only=True,
        ),
        Source(
            "warzone2100",
            ("warzone2100-data",),
            "/usr/share/games/warzone2100",
            find_warzone2100,
            "acted game voices: tutorial, briefings, taunts; Ogg 11-22 kHz inside base.wz; dev-ood",
            kind="acted-nb",
            ood_only=True,
        ),
        Source(
            "redeclipse",
            ("redeclipse-data",),
            "/usr/share/games/redeclipse/data/sounds",
            find_redeclipse,
            "acted, emotional player taunts and announcer calls; Ogg 44.1 kHz; dev-ood",
            kind="acted",
            ood_only=True,
        ),
        Source(
            "horizons",
            ("unknown-horizons",),
            "/usr/share/unknown-horizons/content/audio/voice",
            find_horizons,
            "acted narrator messages in de, en, fr; Ogg 44.1 kHz; dev-ood",
            kind="acted",
            ood_only=True,
        ),
        Source(
            "fotaq",
            ("flight-of-the-amazon-queen",),
            "/usr/share/scummvm/flight-of-the-amazon-queen",
            find_fotaq,
            "adventure game dialogue, acted; MP3 11 kHz inside queen.1c (opt-in, train only)",
            default=False,
            train_only=True,
            kind="acted-nb",
        ),
        Source(
            "drascula",
            ("drascula",),
            "/usr/share/scummvm/drascula/en",
            find_drascula,
            "adventure game dialogue, acted; raw 8-bit 11 kHz (opt-in, train only)",
            default=False,
            train_only=True,
            kind="acted-nb",
        ),
        Source(
            "espeak",
            ("espeak-ng",),
            "/usr/bin",
            find_espeak,
            "synthetic speech, 5 languages x 4 variants (opt-in, train only)",
            default=False,
            train_only=True,
        ),
    ]
}


# --- split ------------------------------------------------------------------------------------------
def _hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def choose_dev_groups(
    groups_by_source: Mapping[str, Collection[str]],
    preferred: Mapping[str, Sequence[str]],
    min_dev: Mapping[str, int],
) -> set[str]:
    """Groups held out for dev: each source's preferred groups that are present, topped up to `min_dev`
    with its other groups in sha1 order (deterministic, independent of input order). A source always
    keeps at least one group for training."""
    dev: set[str] = set()
    for source, groups in groups_by_source.items():
        present = set(groups)
        chosen = [g for g in preferred.get(source, ()) if g in present]
        others = sorted(present - set(chosen), key=_hash)
        chosen += others[: max(0, min_dev.get(source, 0) - len(chosen))]
        dev.update(chosen[: max(0, len(present) - 1)])
    return dev


def assign_splits(
    speaker_groups: Mapping[str, str], dev_groups: Collection[str], ood_groups: Collection[str] = ()
) -> dict[str, str]:
    """speaker -> "dev-ood" when its group is out-of-domain, "dev" when it is held out, else "train"."""

    def split(group: str) -> str:
        return "dev-ood" if group in ood_groups else "dev" if group in dev_groups else "train"

    return {speaker: split(group) for speaker, group in speaker_groups.items()}


def plan_split(items: Sequence[Item], sources: Mapping[str, Source] = SOURCES) -> dict[str, str]:
    """The speaker split for these items: each source's out-of-domain groups first, then its dev preferences
    among the rest (train-only sources excluded from both)."""
    groups_by_source: dict[str, set[str]] = defaultdict(set)
    speaker_groups, ood = {}, set()
    for item in items:
        source = sources[item.source]
        speaker_groups[item.speaker] = item.group
        if source.train_only:
            continue
        if source.is_ood(item.group):
            ood.add(item.group)
        else:
            groups_by_source[item.source].add(item.group)
    dev = choose_dev_groups(
        groups_by_source,
        {name: s.dev for name, s in sources.items()},
        {name: s.min_dev for name, s in sources.items()},
    )
    return assign_splits(speaker_groups, dev, ood)


# --- processing -------------------------------------------------------------------------------------
@dataclass
class ItemResult:
    """What became of one item: written pieces `(relative path, seconds)` or why it was dropped."""

    item: Item
    pieces: list[tuple[str, float]] = field(default_factory=list)
    dropped: str | None = None


G722_BATCH = 32  # files per ffmpeg process: starting ffmpeg costs more than decoding a prompt


def decode_g722(paths: Sequence[str]) -> dict[str, np.ndarray]:
    """Raw G.722 files -> float32 `[T]` at 16 kHz, with one ffmpeg process for all of them (one output per
    input). Files ffmpeg cannot decode are missing from the result."""
    if not paths:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error"]
        for path in paths:
            cmd += ["-f", "g722", "-i", path]
        for i in range(len(paths)):
            cmd += ["-map", f"{i}:a", "-f", "s16le", f"{tmp}/{i}.raw"]
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            if len(paths) == 1:
                return {}
            return {k: v for path in paths for k, v in decode_g722([path]).items()}  # isolate the bad file
        out = {}
        for i, path in enumerate(paths):
            pcm = np.fromfile(f"{tmp}/{i}.raw", dtype="<i2")
            out[path] = pcm.astype(np.float32) / 32768.0  # ffmpeg decodes G.722 at 16 kHz
        return out


@lru_cache(maxsize=8)
def _open_zip(path: str, pid: int) -> zipfile.ZipFile:
    return zipfile.ZipFile(path)


def _zip(path: str) -> zipfile.ZipFile:
    """An open zip archive, one per process: forked workers must not share the parent's file offset."""
    return _open_zip(path, os.getpid())


@lru_cache(maxsize=4)
def _queen_table(path: str) -> dict[str, tuple[int, int]]:
    """Entry name -> (offset, size) in a ScummVM-compressed `queen.1c`: `QTBL`, a 6-byte version, 2 bytes, the
    compression (1: MP3), the entry count (uint16 BE), then 21 bytes an entry: name (12, NUL-padded), bundle
    (1), offset and size (uint32 BE, from the start of the file)."""
    with open(path, "rb") as f:
        head = f.read(15)
        if len(head) < 15 or head[:4] != b"QTBL":
            raise OSError(f"{path}: not a compressed queen.1c (no QTBL table)")
        count = int.from_bytes(head[13:15], "big")
        table = f.read(21 * count)
    if len(table) < 21 * count:
        raise OSError(f"{path}: the table is cut short")
    entries = {}
    for i in range(count):
        entry = table[21 * i : 21 * (i + 1)]
        name = entry[:12].split(b"\0")[0].decode("ascii", "replace")
        entries[name] = (int.from_bytes(entry[13:17], "big"), int.from_bytes(entry[17:21], "big"))
    return entries


def read_bytes(decoder: str, path: str) -> bytes:
    """The bytes of a source file, or of an archive member (`ARCHIVE::MEMBER`) for the `zip` and `queen`
    decoders. OSError (or KeyError for a missing member) when it cannot be read."""
    if decoder == "zip":
        archive, member = path.split("::", 1)
        return _zip(archive).read(member)
    if decoder == "queen":
        archive, member = path.split("::", 1)
        offset, size = _queen_table(archive)[member]
        with open(archive, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) < size:
            raise OSError(f"{path}: entry cut short")
        return data
    with open(path, "rb") as f:
        return f.read()


def decode(item: Item, path: str, g722: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, int]:
    """One source file -> (float32 `[T]` or `[T, C]`, sample rate). `g722` holds pre-decoded G.722 files."""
    if item.decoder == "g722":
        decoded = (g722 if g722 is not None and path in g722 else decode_g722([path])).get(path)
        if decoded is None:
            raise OSError(f"ffmpeg cannot decode {path} as G.722")
        return decoded, SAMPLE_RATE
    if item.decoder == "espeak":
        voice, text = item.src
        cmd = ["espeak-ng", "-v", voice, "--stdout", text]
        wav, rate = sf.read(io.BytesIO(subprocess.run(cmd, capture_output=True, check=True).stdout), dtype="float32")
        return wav, rate
    if item.decoder == "als":
        raw = np.frombuffer(read_bytes(item.decoder, path), dtype=np.uint8)[ALS_PAD:-ALS_PAD]
        return (raw.astype(np.float32) - 128.0) / 128.0, ALS_RATE
    if item.decoder in ("zip", "queen"):
        wav, rate = sf.read(io.BytesIO(read_bytes(item.decoder, path)), dtype="float32")
        return wav, rate
    wav, rate = sf.read(path, dtype="float32")
    return wav, rate


def load_item(item: Item, g722: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, str | None]:
    """Decode, mix down, resample and trim an item (concatenating its files with 0.15 s pauses).
    Returns (`[T]` at 16 kHz, None) or (empty, reason)."""
    paths = (item.src[0],) if item.decoder == "espeak" else item.src
    parts = []
    for path in paths:
        try:
            wav, rate = decode(item, path, g722)
        except (
            subprocess.CalledProcessError,
            sf.LibsndfileError,
            RuntimeError,
            OSError,
            KeyError,
            zipfile.BadZipFile,
        ) as exc:
            return np.zeros(0, np.float32), f"unreadable: {type(exc).__name__}"
        if rate < item.min_rate:
            return np.zeros(0, np.float32), f"below {item.min_rate} Hz"
        wav = to_mono(wav)
        if len(wav) == 0 or not np.all(np.isfinite(wav)):
            return np.zeros(0, np.float32), "empty or not finite"
        wav = resample(wav - wav.mean(), rate)
        wav = trim_silence(wav, margin=0.05 if len(paths) > 1 else 0.1)
        if len(wav):
            parts.append(wav)
    if not parts:
        return np.zeros(0, np.float32), "silent"
    if len(parts) > 1:
        pause = np.zeros(int(0.15 * SAMPLE_RATE), np.float32)
        parts = [x for part in parts for x in (part, pause)][:-1]
    return np.concatenate(parts), None


def process_item(
    item: Item,
    out_dir: Path,
    g722: Mapping[str, np.ndarray] | None = None,
    seconds: tuple[float, float] = (MIN_SECONDS, MAX_SECONDS),
) -> ItemResult:
    """Convert one item into `out_dir/wav/<speaker>/<name>[-NN].wav` pieces of `seconds` = (shortest,
    longest) seconds: longer audio is cut, shorter pieces are dropped."""
    result = ItemResult(item)
    wav, reason = load_item(item, g722)
    if reason:
        result.dropped = reason
        return result
    shortest, longest = seconds
    pieces = [p for p in split_long(wav, max_seconds=longest) if len(p) >= shortest * SAMPLE_RATE]
    if not pieces:
        result.dropped = f"shorter than {shortest} s"
        return result
    folder = out_dir / "wav" / item.speaker
    folder.mkdir(parents=True, exist_ok=True)
    for i, piece in enumerate(pieces):
        name = item.name if len(pieces) == 1 else f"{item.name}-{i:02d}"
        sf.write(folder / f"{name}.wav", to_pcm16(piece)[0], SAMPLE_RATE, subtype="PCM_16")
        result.pieces.append((f"wav/{item.speaker}/{name}.wav", len(piece) / SAMPLE_RATE))
    return result


def process_batch(args: tuple[Sequence[Item], Path, Mapping[str, str]]) -> list[ItemResult]:
    """Process a batch of items (the pool's unit of work) with the piece lengths of each speaker's split,
    decoding its G.722 files with one ffmpeg call."""
    items, out_dir, splits = args
    g722 = decode_g722([p for item in items if item.decoder == "g722" for p in item.src])
    return [process_item(item, out_dir, g722, SPLIT_SECONDS[splits[item.speaker]]) for item in items]


def _file_hash(decoder: str, path: str) -> str:
    try:
        return hashlib.sha1(read_bytes(decoder, path)).hexdigest()
    except (OSError, KeyError, zipfile.BadZipFile):
        return f"unreadable:{path}"  # kept, so that processing reports it as unreadable


def deduplicate(items: Sequence[Item]) -> tuple[list[Item], int]:
    """Drop items whose source bytes repeat an earlier item's (packages ship the same recording under
    several names, e.g. KTuberling's four Serbian folders) and repeated output names. Returns (kept, dropped)."""
    seen, names, kept = set(), set(), []
    for item in items:
        key = item.src if item.decoder == "espeak" else tuple(_file_hash(item.decoder, p) for p in item.src)
        name = (item.speaker, item.name)
        if key in seen or name in names:
            continue
        seen.add(key)
        names.add(name)
        kept.append(item)
    return kept, len(items) - len(kept)


# --- packages ---------------------------------------------------------------------------------------
def installed(package: str) -> bool:
    """Whether dpkg knows the package as installed (False when dpkg is absent)."""
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    except FileNotFoundError:
        return False
    return out.returncode == 0 and out.stdout.strip().endswith("installed") and "not-installed" not in out.stdout


def install_command(packages: Sequence[str]) -> list[str]:
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    return cmd if os.geteuid() == 0 else ["sudo", *cmd]


# --- build ------------------------------------------------------------------------------------------
@dataclass
class BuildReport:
    """The outcome of `build_corpus`."""

    rows: list[ManifestRow]
    dropped: dict[str, int]
    duplicates: int
    seconds: float


def collect_items(sources: Sequence[Source], roots: Mapping[str, Path] | None = None) -> list[Item]:
    items = []
    for source in sources:
        root = Path((roots or {}).get(source.name, source.root))
        if root.is_dir():
            items += source.find(root)
    return items


def build_corpus(
    out_dir: Path,
    sources: Sequence[Source],
    jobs: int = 1,
    roots: Mapping[str, Path] | None = None,
    progress: bool = True,
) -> BuildReport:
    """Convert every installed file of `sources` into `out_dir` and write the three manifests.

    Args:
        out_dir: the corpus folder (`wav/`, `manifest.csv` and one manifest per split are written there).
        sources: what to build.
        jobs: worker processes (1 runs in this process).
        roots: overrides of `Source.root` by source name (tests use fake trees).
        progress: show a tqdm bar on stderr.
    """
    start = time.monotonic()
    items, duplicates = deduplicate(collect_items(sources, roots))
    if not items:
        raise AudioError("no source files found: install the packages listed above (or pass --install)")
    source_map = {**SOURCES, **{s.name: s for s in sources}}
    splits = plan_split(items, source_map)
    batches = [(items[i : i + G722_BATCH], out_dir, splits) for i in range(0, len(items), G722_BATCH)]
    results: list[ItemResult] = []
    bar = _progress(len(items), progress)
    with Pool(jobs) if jobs > 1 else _Serial() as pool:
        for batch in pool.imap_unordered(process_batch, batches):
            results += batch
            bar.update(len(batch))
    bar.close()
    rows, dropped = [], defaultdict(int)
    for r in results:
        if r.dropped:
            dropped[r.dropped.split(":")[0]] += 1
        for path, seconds in r.pieces:
            item = r.item
            rows.append(
                ManifestRow(
                    path,
                    item.speaker,
                    seconds,
                    splits[item.speaker],
                    item.source,
                    item.language,
                    source_map[item.source].kind,
                )
            )
    write_manifest(out_dir / "manifest.csv", rows)
    for split in SPLITS:
        write_manifest(out_dir / f"{split}.csv", [r for r in rows if r.split == split])
    return BuildReport(sorted(rows, key=lambda r: r.path), dict(dropped), duplicates, time.monotonic() - start)


class _Serial:
    """Stands in for a process pool when jobs == 1 (tests, debugging)."""

    def __enter__(self) -> "_Serial":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def imap_unordered(self, fn, iterable):
        return map(fn, iterable)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="corpus", file=sys.stderr, mininterval=2.0, disable=not enabled)


def summary_table(rows: Sequence[ManifestRow]) -> str:
    """Minutes and files per split/source/speaker, then per split/source and per split."""

    def line(a, b, c, files, seconds):
        return f"| {a:<7} | {b:<11} | {c:<36} | {files:>6} | {seconds / 60:>8.1f} |"

    out = [
        f"| {'split':<7} | {'source':<11} | {'speaker':<36} | {'files':>6} | {'minutes':>8} |",
        "|---------|-------------|--------------------------------------|--------|----------|",
    ]
    by_key: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in rows:
        by_key[(r.split, r.source, r.speaker)].append(r.duration)
        by_key[(r.split, r.source, "(all)")].append(r.duration)
        by_key[(r.split, "(all)", "(all)")].append(r.duration)
        by_key[("all", "(all)", "(all)")].append(r.duration)
    order = {**{split: i for i, split in enumerate(SPLITS)}, "all": len(SPLITS)}
    for key in sorted(by_key, key=lambda k: (order[k[0]], k[1] == "(all)", k[1], k[2] == "(all)", k[2])):
        out.append(line(*key, len(by_key[key]), sum(by_key[key])))
    return "\n".join(out)


def kind_table(rows: Sequence[ManifestRow], split: str = "dev-ood") -> str:
    """Voices, languages, files and minutes per kind of speech in one split (the out-of-domain dev set's
    composition)."""
    by_kind: dict[str, list[ManifestRow]] = defaultdict(list)
    for r in rows:
        if r.split == split:
            by_kind[r.kind].append(r)
    out = [
        f"| {'kind':<10} | {'voices':>6} | {'languages':<24} | {'files':>6} | {'minutes':>8} |",
        "|------------|--------|--------------------------|--------|----------|",
    ]
    for kind, kind_rows in [*sorted(by_kind.items()), ("(all)", [r for r in rows if r.split == split])]:
        languages = ", ".join(sorted({r.language for r in kind_rows}))
        minutes = sum(r.duration for r in kind_rows) / 60
        out.append(
            f"| {kind:<10} | {len({r.speaker for r in kind_rows}):>6} | {languages:<24} | "
            f"{len(kind_rows):>6} | {minutes:>8.1f} |"
        )
    return "\n".join(out)


def select_sources(names: Sequence[str] | None) -> list[Source]:
    """`None` -> the default sources; `all` -> every source; else the named ones, where `default` stands for
    the default sources (`default fotaq` adds an opt-in source to them)."""
    names = list(names or ["default"])
    if names == ["all"]:
        return list(SOURCES.values())
    defaults = [s.name for s in SOURCES.values() if s.default]
    expanded = [n for name in names for n in (defaults if name == "default" else [name])]
    unknown = [n for n in expanded if n not in SOURCES]
    if unknown:
        raise AudioError(f"unknown source(s) {', '.join(unknown)}; choose from {', '.join(SOURCES)}, default, all")
    return [SOURCES[n] for n in dict.fromkeys(expanded)]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", type=Path, help="corpus folder to create (e.g. data/corpus)")
    parser.add_argument(
        "--sources",
        nargs="+",
        metavar="NAME",
        help=f"sources to build: {', '.join(SOURCES)}; 'default' (the default sources, also "
        "in a list: 'default fotaq') or 'all'",
    )
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--install", action="store_true", help="apt-get install missing packages first")
    parser.add_argument("--force", action="store_true", help="replace an existing corpus in --out")
    parser.add_argument("--list-sources", action="store_true", help="print the sources and what is installed")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    """Command entry point: returns the exit code (2 for errors a user can fix)."""
    try:
        sources = select_sources(args.sources)
    except AudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.list_sources:
        for s in SOURCES.values():
            state = ", ".join(f"{p}{'' if installed(p) else ' (missing)'}" for p in s.packages)
            print(f"{s.name:<12} {'default' if s.default else 'opt-in':<8} {s.summary}\n{'':21}{state}")
        return 0
    if args.out is None:
        print("error: --out is required", file=sys.stderr)
        return 2
    missing = [p for s in sources for p in s.packages if not installed(p)]
    if missing:
        cmd = install_command(missing)
        if args.install:
            print("installing: " + " ".join(cmd), file=sys.stderr)
            if subprocess.run(cmd).returncode != 0:
                print("error: apt-get install failed", file=sys.stderr)
                return 2
        else:
            print(
                f"warning: not installed: {' '.join(missing)}\n  install with: {' '.join(cmd)}"
                "\n  (or pass --install); building from what is there",
                file=sys.stderr,
            )
    out: Path = args.out
    if (out / "manifest.csv").exists() or (out / "wav").exists():
        if not args.force:
            print(f"error: {out} already holds a corpus; pass --force to rebuild it", file=sys.stderr)
            return 2
        shutil.rmtree(out / "wav", ignore_errors=True)
        for name in ("manifest.csv", *(f"{s}.csv" for s in SPLITS)):
            (out / name).unlink(missing_ok=True)
    try:
        report = build_corpus(out, sources, jobs=max(1, args.jobs), progress=not args.quiet)
    except AudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary_table(report.rows))
    if any(r.split == "dev-ood" for r in report.rows):
        print("\nOut-of-domain dev set (dev-ood.csv):\n" + kind_table(report.rows))
    dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(report.dropped.items())) or "none"
    print(
        f"\n{len(report.rows)} files in {out}; dropped: {dropped}; duplicates skipped: {report.duplicates}; "
        f"built in {report.seconds:.0f} s"
    )
    return 0


def register(subparsers) -> None:
    """Add the `corpus` subcommand (for a CLI that discovers `register(subparsers)` plugins)."""
    parser = subparsers.add_parser("corpus", help="build the training corpus from Debian speech packages")
    add_arguments(parser).set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.corpus", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
