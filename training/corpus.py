"""Training corpus recipe: real recorded speech from Debian packages -> 16 kHz mono WAV files plus manifests.

    python -m training.corpus --out data/corpus [--sources asterisk klettres ...] [--install]

Every source is a Debian package set that installs on the training machine (docs/corpus.md has the table,
licences and the dev/train split). Each file is decoded (ffmpeg for raw G.722 only, soundfile otherwise),
mixed down to mono, resampled to 16 kHz with soxr, stripped of long leading/trailing silence, dropped when
shorter than 0.3 s and cut (at the quietest point) when longer than 30 s. Output:

    OUT/wav/<speaker>/<name>.wav        16 kHz mono 16-bit PCM
    OUT/manifest.csv                    path,speaker,duration,split,source,language (path relative to OUT)
    OUT/train.csv, OUT/dev.csv          the same rows, by split

The split holds out whole voices: all speaker ids of one person (`Item.group`) share a split.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Collection, Iterable, Mapping, Sequence

import numpy as np
import soundfile as sf
import soxr

from codec.audio import to_pcm16
from codec.errors import AudioError

SAMPLE_RATE = 16000
MIN_SECONDS = 0.3
MAX_SECONDS = 30.0
MANIFEST_COLUMNS = ("path", "speaker", "duration", "split", "source", "language")
SPLITS = ("train", "dev")


# --- manifest ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ManifestRow:
    """One output file. `path` is relative to the corpus folder; `duration` in seconds."""

    path: str
    speaker: str
    duration: float
    split: str
    source: str
    language: str


def write_manifest(path: Path, rows: Iterable[ManifestRow]) -> int:
    """Write rows (sorted by path) as CSV with the `MANIFEST_COLUMNS` header; returns the row count."""
    rows = sorted(rows, key=lambda r: r.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        for r in rows:
            writer.writerow([r.path, r.speaker, f"{r.duration:.3f}", r.split, r.source, r.language])
    tmp.replace(path)
    return len(rows)


def read_manifest(path: Path) -> list[ManifestRow]:
    """Read a manifest written by `write_manifest`; AudioError naming the line on any malformed row."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"no manifest at {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = tuple(next(reader, ()))
        if header != MANIFEST_COLUMNS:
            expected, got = ",".join(MANIFEST_COLUMNS), ",".join(header) or "nothing"
            raise AudioError(f"{path}: header must be {expected}, got {got}")
        rows = []
        for line_no, values in enumerate(reader, start=2):
            if len(values) != len(MANIFEST_COLUMNS):
                raise AudioError(f"{path}:{line_no}: expected {len(MANIFEST_COLUMNS)} columns, got {len(values)}")
            p, speaker, duration, split, source, language = values
            try:
                seconds = float(duration)
            except ValueError:
                raise AudioError(f"{path}:{line_no}: duration {duration!r} is not a number") from None
            if not (seconds > 0 and np.isfinite(seconds)):
                raise AudioError(f"{path}:{line_no}: duration must be positive, got {duration}")
            if split not in SPLITS:
                raise AudioError(f"{path}:{line_no}: split must be one of {', '.join(SPLITS)}, got {split!r}")
            if not p or not speaker or Path(p).is_absolute():
                raise AudioError(f"{path}:{line_no}: path must be relative and speaker non-empty")
            rows.append(ManifestRow(p, speaker, seconds, split, source, language))
    return rows


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
        src: file paths, or for the `espeak` decoder `(voice, text)`.
        speaker: stable speaker id (`source-language-voice`), the output folder name.
        group: the person behind the voice; speakers of one group always share a split.
        source: source name (a key of `SOURCES`).
        language: BCP 47 tag such as `en-US`.
        name: output file stem, unique within the speaker.
        decoder: `soundfile`, `g722` (ffmpeg) or `espeak` (espeak-ng).
        min_rate: files recorded below this rate (Hz) are dropped: upsampled narrowband is not 16 kHz speech.
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
        train_only: synthetic or narrowband: never in the dev split.
        dev: groups held out for dev, in order of preference.
        min_dev: if fewer of `dev` are installed, more groups of this source are held out (chosen by hash).
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


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_") or "x"


def _bcp47(code: str) -> str:
    lang, _, region = code.partition("_")
    return f"{lang.lower()}-{region.upper()}" if region and "@" not in region else lang.lower()


def _stem(rel: Path) -> str:
    return "_".join(_slug(part) for part in rel.with_suffix("").parts)


ASTERISK_VOICE = re.compile(r"^(?P<lang>[a-z]{2})_(?P<region>[A-Z]{2})_(?P<gender>[fm])_(?P<voice>\w+)$")
ASTERISK_NON_SPEECH = {"beep", "beeperr", "ascending-2tone", "descending-2tone"}


def find_asterisk(root: Path) -> list[Item]:
    """Asterisk core sounds in G.722: one folder per voice and language, e.g. `fr_CA_f_June`."""
    items = []
    for folder in sorted(p for p in root.glob("*_*_*_*") if p.is_dir()):
        m = ASTERISK_VOICE.match(folder.name)
        if not m:
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


def find_asterisk_narrowband(root: Path) -> list[Item]:
    """asterisk-prompt-it-menardi-wav: Italian prompts as 8 kHz PCM WAV (opt-in, train only)."""
    folder = root / "it_IT_f_Menardi"
    speaker = "asterisk-it-menardi"
    return [Item((str(f),), speaker, "asterisk-menardi", "asterisk-nb", "it-IT", _stem(f.relative_to(folder)),
                 min_rate=8000) for f in sorted(folder.rglob("*.wav"))]


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


def find_gcin(root: Path) -> list[Item]:
    """gcin-voice Mandarin syllables (`<zhuyin>/<voice>.ogg`), concatenated into ~5 s utterances."""
    items = []
    for key, voice in GCIN_VOICES.items():
        files = sorted(str(f) for f in root.glob(f"*/{key}.ogg"))
        speaker = f"gcin-zh-{voice}"
        for i in range(0, len(files), GCIN_PER_ITEM):
            chunk = tuple(files[i : i + GCIN_PER_ITEM])
            items.append(Item(chunk, speaker, speaker, "gcin", "zh-TW", f"{i // GCIN_PER_ITEM:04d}"))
    return items


ESPEAK_TEXT = {
    "en": ["The quick brown fox jumps over the lazy dog.", "Please leave your message after the tone.",
           "It is seven thirty in the morning and the train is late again.", "Would you like a cup of tea?"],
    "fr": ["Le petit chat dort sur le canapé du salon.", "Veuillez laisser votre message après le signal.",
           "Il fait beau aujourd'hui, allons marcher au bord de la rivière.",
           "Combien coûte ce livre, s'il vous plaît ?"],
    "es": ["El perro corre por el parque todas las mañanas.", "Por favor, deje su mensaje después de la señal.",
           "Mañana vamos a visitar a mis abuelos en el campo.", "¿Dónde está la estación de tren?"],
    "de": ["Der Hund schläft vor dem warmen Ofen.", "Bitte hinterlassen Sie eine Nachricht nach dem Signalton.",
           "Morgen fahren wir mit dem Fahrrad an den See.", "Wie viel kostet diese Zeitung?"],
    "it": ["Il gatto dorme sulla sedia della cucina.", "Per favore, lasci un messaggio dopo il segnale acustico.",
           "Domani andiamo al mare con tutta la famiglia.", "Quanto costa questo biglietto?"],
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
        Source("asterisk", tuple(f"asterisk-core-sounds-{lang}-g722" for lang in ("en", "es", "fr", "it", "ru")),
               "/usr/share/asterisk/sounds", find_asterisk,
               "telephone prompts, whole sentences; 4 voices, 5 languages; G.722 16 kHz",
               dev=("asterisk-june", "asterisk-carlo"), min_dev=1),
        Source("klettres", ("klettres-data",), "/usr/share/klettres", find_klettres,
               "letters and syllables; ~20 voices/languages; Ogg Vorbis 44.1 kHz",
               dev=("klettres-he", "klettres-hu", "klettres-cs"), min_dev=2),
        Source("ktuberling", ("ktuberling-data",), "/usr/share/ktuberling/sounds", find_ktuberling,
               "spoken object names; 17 voices/languages; Ogg/WAV 22-44 kHz (8 kHz files dropped)",
               dev=("ktuberling-gl", "ktuberling-sl"), min_dev=1),
        Source("tuxpaint", ("tuxpaint-stamps-default",), "/usr/share/tuxpaint/stamps", find_tuxpaint,
               "spoken stamp descriptions (words, short phrases); 14 languages; Ogg Vorbis 44.1 kHz",
               dev=("tuxpaint-bg",), min_dev=1),
        Source("gcin", ("gcin-voice",), "/usr/share/gcin-voice/ogg", find_gcin,
               "Mandarin syllables with tones; 2 voices; Ogg Vorbis 44.1 kHz"),
        Source("asterisk-nb", ("asterisk-prompt-it-menardi-wav",), "/usr/share/asterisk/sounds",
               find_asterisk_narrowband, "Italian prompts, 1 voice; 8 kHz PCM (narrowband: opt-in, train only)",
               default=False, train_only=True),
        Source("espeak", ("espeak-ng",), "/usr/bin", find_espeak,
               "synthetic speech, 5 languages x 4 variants (opt-in, train only)", default=False, train_only=True),
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


def assign_splits(speaker_groups: Mapping[str, str], dev_groups: Collection[str]) -> dict[str, str]:
    """speaker -> "dev" when its group is held out, else "train"."""
    return {speaker: "dev" if group in dev_groups else "train" for speaker, group in speaker_groups.items()}


def plan_split(items: Sequence[Item], sources: Mapping[str, Source] = SOURCES) -> dict[str, str]:
    """The speaker split for these items under each source's dev preferences (train-only sources excluded)."""
    groups_by_source: dict[str, set[str]] = defaultdict(set)
    speaker_groups = {}
    for item in items:
        speaker_groups[item.speaker] = item.group
        if not sources[item.source].train_only:
            groups_by_source[item.source].add(item.group)
    dev = choose_dev_groups(
        groups_by_source,
        {name: s.dev for name, s in sources.items()},
        {name: s.min_dev for name, s in sources.items()},
    )
    return assign_splits(speaker_groups, dev)


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
        except (subprocess.CalledProcessError, sf.LibsndfileError, RuntimeError, OSError) as exc:
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


def process_item(item: Item, out_dir: Path, g722: Mapping[str, np.ndarray] | None = None) -> ItemResult:
    """Convert one item into `out_dir/wav/<speaker>/<name>[-NN].wav` pieces."""
    result = ItemResult(item)
    wav, reason = load_item(item, g722)
    if reason:
        result.dropped = reason
        return result
    pieces = [p for p in split_long(wav) if len(p) >= MIN_SECONDS * SAMPLE_RATE]
    if not pieces:
        result.dropped = f"shorter than {MIN_SECONDS} s"
        return result
    folder = out_dir / "wav" / item.speaker
    folder.mkdir(parents=True, exist_ok=True)
    for i, piece in enumerate(pieces):
        name = item.name if len(pieces) == 1 else f"{item.name}-{i:02d}"
        sf.write(folder / f"{name}.wav", to_pcm16(piece)[0], SAMPLE_RATE, subtype="PCM_16")
        result.pieces.append((f"wav/{item.speaker}/{name}.wav", len(piece) / SAMPLE_RATE))
    return result


def process_batch(args: tuple[Sequence[Item], Path]) -> list[ItemResult]:
    """Process a batch of items (the pool's unit of work), decoding its G.722 files with one ffmpeg call."""
    items, out_dir = args
    g722 = decode_g722([p for item in items if item.decoder == "g722" for p in item.src])
    return [process_item(item, out_dir, g722) for item in items]


def _file_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def deduplicate(items: Sequence[Item]) -> tuple[list[Item], int]:
    """Drop items whose source bytes repeat an earlier item's (packages ship the same recording under
    several names, e.g. KTuberling's four Serbian folders) and repeated output names. Returns (kept, dropped)."""
    seen, names, kept = set(), set(), []
    for item in items:
        key = item.src if item.decoder == "espeak" else tuple(_file_hash(p) for p in item.src)
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
        out_dir: the corpus folder (`wav/`, `manifest.csv`, `train.csv`, `dev.csv` are written there).
        sources: what to build.
        jobs: worker processes (1 runs in this process).
        roots: overrides of `Source.root` by source name (tests use fake trees).
        progress: show a tqdm bar on stderr.
    """
    start = time.monotonic()
    items, duplicates = deduplicate(collect_items(sources, roots))
    if not items:
        raise AudioError("no source files found: install the packages listed above (or pass --install)")
    source_map = {s.name: s for s in sources}
    splits = plan_split(items, {**SOURCES, **source_map})
    batches = [(items[i : i + G722_BATCH], out_dir) for i in range(0, len(items), G722_BATCH)]
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
            rows.append(ManifestRow(path, item.speaker, seconds, splits[item.speaker], item.source, item.language))
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
        return f"| {a:<5} | {b:<11} | {c:<24} | {files:>6} | {seconds / 60:>8.1f} |"

    out = [f"| {'split':<5} | {'source':<11} | {'speaker':<24} | {'files':>6} | {'minutes':>8} |",
           "|-------|-------------|--------------------------|--------|----------|"]
    by_key: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for r in rows:
        by_key[(r.split, r.source, r.speaker)].append(r.duration)
        by_key[(r.split, r.source, "(all)")].append(r.duration)
        by_key[(r.split, "(all)", "(all)")].append(r.duration)
        by_key[("all", "(all)", "(all)")].append(r.duration)
    order = {"train": 0, "dev": 1, "all": 2}
    for key in sorted(by_key, key=lambda k: (order[k[0]], k[1] == "(all)", k[1], k[2] == "(all)", k[2])):
        out.append(line(*key, len(by_key[key]), sum(by_key[key])))
    return "\n".join(out)


def select_sources(names: Sequence[str] | None) -> list[Source]:
    """`None` or `default` -> the default sources; `all` -> every source; else the named ones."""
    if not names or list(names) == ["default"]:
        return [s for s in SOURCES.values() if s.default]
    if list(names) == ["all"]:
        return list(SOURCES.values())
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise AudioError(f"unknown source(s) {', '.join(unknown)}; choose from {', '.join(SOURCES)}, default, all")
    return [SOURCES[n] for n in names]


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", type=Path, help="corpus folder to create (e.g. data/corpus)")
    parser.add_argument("--sources", nargs="+", metavar="NAME",
                        help=f"sources to build: {', '.join(SOURCES)}; 'default' (the default) or 'all'")
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
            print(f"warning: not installed: {' '.join(missing)}\n  install with: {' '.join(cmd)}"
                  "\n  (or pass --install); building from what is there", file=sys.stderr)
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
    dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(report.dropped.items())) or "none"
    print(f"\n{len(report.rows)} files in {out}; dropped: {dropped}; duplicates skipped: {report.duplicates}; "
          f"built in {report.seconds:.0f} s")
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
