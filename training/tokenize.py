"""`simvq-codec tokenize`: a folder or manifest of audio -> sharded Parquet token tables, locally or on Ray Data.

Output folder:

    index.json              model, stages, shard size and a fingerprint of the inputs (checked on rerun)
    shard-00000.parquet     path, speaker, duration, num_frames, codes (list<list<uint16>>, [stage][frame])
    errors/shard-00000.parquet   path, reason: the files of that shard that failed
    errors.parquet          every failure of every shard (rewritten at the end of each run)

At the end the command prints each stage's codebook use over every shard in the folder (`code_use`): the
share of codes used and the entropy in bits, the figures that say how well a token stream uses its bits.

A shard holds `shard_size` consecutive inputs and is written atomically once all of them are done, so a
rerun skips the shards already there. The Parquet schema metadata (`simvq`) repeats the model facts.
Clips are encoded in padded batches budgeted by audio seconds; the model is causal, so right-padding
never changes a clip's codes (the tests compare them with clips encoded alone).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from codec.errors import CodecError
from codec.manifest import read_listing
from codec.stages import resolve_stages, stages_or_all

TOKENS_FORMAT = "simvq-tokens/1"
DEFAULT_SHARD_SIZE = 1000
DEFAULT_BATCH_SECONDS = 60.0  # padded audio per forward pass (clips x longest clip)
LONG_CLIP_SECONDS = 60.0  # longer files are encoded alone, streaming in blocks (flat memory)
CHUNK_FILES = 8  # files per task sent to a worker


# --- inputs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Item:
    """One input file as the job carries it (to local workers and as a Ray Data row).

    index: position in the input list (fixes its shard and its row order).
    path: absolute path read by the workers.
    key: the path as written to the output (relative to the folder, or as the manifest wrote it).
    speaker: from the manifest's `speaker` column, else guessed from the folders.
    """

    index: int
    path: str
    key: str
    speaker: str


def load_inputs(source: str | os.PathLike) -> list[Item]:
    """The files of a folder tree (every wav/flac/ogg, sorted) or a manifest, read by
    `codec.manifest.read_listing`, numbered in order."""
    return [Item(i, str(it.path), it.key, it.speaker) for i, it in enumerate(read_listing(source))]


def fingerprint(items: Sequence[Item]) -> str:
    """sha256 of the ordered (key, speaker) list: a rerun must see the same inputs to reuse shards."""
    h = hashlib.sha256()
    for item in items:
        h.update(f"{item.key}\t{item.speaker}\n".encode())
    return h.hexdigest()


# --- encoding ----------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """Tokens of one file: `codes [S, F]` uint16, `duration` in seconds of the original audio."""

    item: Item
    duration: float
    codes: np.ndarray


@dataclass
class Failed:
    """A file that could not be tokenised and why (one line)."""

    item: Item
    reason: str


def plan_batches(seconds: Sequence[float], budget_s: float) -> list[list[int]]:
    """Group clip indices into batches whose padded size (clips x longest) stays within `budget_s`.

    Clips are taken shortest first, so similar lengths share a batch and little is padding; a clip longer
    than the budget forms a batch of its own."""
    order = sorted(range(len(seconds)), key=lambda i: seconds[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * seconds[i] > budget_s:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, CodecError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Tokenizer:
    """Loads the model once and turns lists of files into `Encoded` / `Failed` results.

    Args:
        model: preset id or model directory (None: the default model).
        device: "cpu", "cuda", "cuda:1", or "auto" (CUDA when available).
        n_stages: residual stages to keep (None: all).
        threads: torch intra-op threads (0 leaves torch's default).
        batch_seconds: padded audio seconds per forward pass.
    """

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        n_stages: int | None = None,
        threads: int = 1,
        batch_seconds: float = DEFAULT_BATCH_SECONDS,
    ) -> None:
        import torch

        from codec.presets import load_model

        if threads:
            torch.set_num_threads(threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(model, device=device, warn=False).model
        self.device = torch.device(device)
        self.n_stages = stages_or_all(n_stages, self.model.n_stages)
        self.batch_seconds = batch_seconds

    def __call__(self, items: Sequence[Item]) -> list[Encoded | Failed]:
        """Tokenise `items`; every file gets a result, in the order given."""
        from codec.audio import AudioReader

        rate = self.model.sample_rate
        results: dict[int, Encoded | Failed] = {}
        short: list[tuple[Item, np.ndarray, float]] = []
        for item in items:
            try:
                with AudioReader(item.path, rate) as reader:
                    info = reader.info
                    if info.frames is not None and info.frames / info.sample_rate > LONG_CLIP_SECONDS:
                        codes = self._encode_stream(reader.blocks())
                        results[item.index] = Encoded(item, info.frames / info.sample_rate, codes)
                        continue
                    wav = np.concatenate(list(reader.blocks()))
                short.append((item, wav, info.frames / info.sample_rate if info.frames else len(wav) / rate))
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the job
                results[item.index] = Failed(item, _reason(exc))
        for group in plan_batches([len(w) / rate for _, w, _ in short], self.batch_seconds):
            members = [short[i] for i in group]
            try:
                codes = self._encode_arrays([w for _, w, _ in members])
            except Exception:  # noqa: BLE001 - retry one by one to find the culprit
                codes = []
                for _, w, _ in members:
                    try:
                        codes.append(self._encode_arrays([w])[0])
                    except Exception as exc:  # noqa: BLE001
                        codes.append(exc)
            for (item, _, seconds), c in zip(members, codes):
                failed = isinstance(c, BaseException)
                results[item.index] = Failed(item, _reason(c)) if failed else Encoded(item, seconds, c)
        return [results[item.index] for item in items]

    def _encode_arrays(self, wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        import torch

        clips = [torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).to(self.device) for w in wavs]
        from codec.batching import encode_padded

        return [c.cpu().numpy().astype(np.uint16) for c in encode_padded(self.model, clips, self.n_stages)]

    def _encode_stream(self, blocks: Iterable[np.ndarray]) -> np.ndarray:
        import torch

        parts, stream = [], self.model.stream(1)
        with torch.inference_mode():
            for block in blocks:
                parts.append(stream.encode(torch.from_numpy(block).to(self.device)[None, None], self.n_stages)[0])
            parts.append(stream.flush_encoder(self.n_stages)[0])
        return torch.cat(parts, dim=-1).cpu().numpy().astype(np.uint16)


# --- output ------------------------------------------------------------------------------------------
def shard_path(out: Path, shard: int) -> Path:
    return out / f"shard-{shard:05d}.parquet"


def error_path(out: Path, shard: int) -> Path:
    return out / "errors" / f"shard-{shard:05d}.parquet"


def _codes_array(codes: Sequence[np.ndarray]) -> Any:
    """list<list<uint16>> column from `[S, F]` arrays without a Python loop over codes."""
    import pyarrow as pa

    values = np.concatenate([c.reshape(-1) for c in codes]) if codes else np.zeros(0, np.uint16)
    rows_per_item = [c.shape[0] for c in codes]
    inner_lengths = np.concatenate([np.full(c.shape[0], c.shape[1]) for c in codes]) if codes else np.zeros(0)
    inner_offsets = np.concatenate([[0], np.cumsum(inner_lengths)]).astype(np.int32)
    outer_offsets = np.concatenate([[0], np.cumsum(rows_per_item)]).astype(np.int32)
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), pa.array(values.astype(np.uint16)))
    return pa.ListArray.from_arrays(pa.array(outer_offsets), inner)


def token_table(rows: Sequence[Encoded], metadata: dict[str, Any]) -> Any:
    import pyarrow as pa

    table = pa.table(
        {
            "path": pa.array([r.item.key for r in rows], pa.string()),
            "speaker": pa.array([r.item.speaker for r in rows], pa.string()),
            "duration": pa.array([r.duration for r in rows], pa.float64()),
            "num_frames": pa.array([r.codes.shape[1] for r in rows], pa.int32()),
            "codes": _codes_array([r.codes for r in rows]),
        }
    )
    return table.replace_schema_metadata({"simvq": json.dumps(metadata)})


def error_table(rows: Sequence[Failed]) -> Any:
    import pyarrow as pa

    return pa.table(
        {
            "path": pa.array([r.item.key for r in rows], pa.string()),
            "reason": pa.array([r.reason for r in rows], pa.string()),
        }
    )


def _write_atomic(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def write_shard(out: Path, shard: int, results: Sequence[Encoded | Failed], metadata: dict[str, Any]) -> None:
    """Errors first, then the token file: a shard file on disk means the shard is complete."""
    results = sorted(results, key=lambda r: r.item.index)
    _write_atomic(error_table([r for r in results if isinstance(r, Failed)]), error_path(out, shard))
    _write_atomic(token_table([r for r in results if isinstance(r, Encoded)], metadata), shard_path(out, shard))


# --- the job -----------------------------------------------------------------------------------------
@dataclass
class TokenizeResult:
    """What one run did; `speed` is audio hours tokenised per wall-clock hour (files of skipped shards excluded)."""

    files: int
    encoded: int = 0
    failed: int = 0
    shards: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def speed(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0


def _check_index(out: Path, index: dict[str, Any], force: bool) -> None:
    path = out / "index.json"
    if path.exists() and not force:
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise CodecError(f"{path} is unreadable: remove it or pass --force to start over") from None
        keys = ("format", "weights_sha256", "n_stages", "shard_size", "inputs_sha256")
        changed = [k for k in keys if old.get(k) != index.get(k)]
        if changed:
            raise CodecError(
                f"{out} holds tokens made with a different {', '.join(changed)}: "
                "use another --out, or --force to delete them and start over"
            )
    if force:
        for p in list(out.glob("shard-*.parquet")) + [out / "errors", out / "errors.parquet"]:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")


def _index(model_ref: str | None, n_stages: int | None, shard_size: int, items: Sequence[Item], source: str) -> dict:
    from codec.presets import describe

    config = describe(model_ref)
    stages = stages_or_all(n_stages, config["n_stages"])
    sizes = config["codebook_size"]  # one size for every stage, or one per stage
    sizes = list(sizes) if isinstance(sizes, list) else [sizes] * config["n_stages"]
    return {
        "format": TOKENS_FORMAT,
        "model_id": config.get("model_id") or str(model_ref),
        "weights_sha256": config["sha256"],
        "sample_rate": config["sample_rate"],
        "hop_length": config["model"]["hop_length"],
        "frame_rate": config["frame_rate"],
        "n_stages": stages,
        "codebook_size": config["codebook_size"],
        "codebook_sizes": sizes[:stages],
        "shard_size": shard_size,
        "files": len(items),
        "shards": -(-len(items) // shard_size),
        "inputs_sha256": fingerprint(items),
        "input": source,
    }


def tokenize(
    source: str | os.PathLike,
    out: str | os.PathLike,
    model: str | None = None,
    n_stages: int | None = None,
    workers: int = 1,
    use_ray: bool = False,
    ray_address: str | None = None,
    device: str = "auto",
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_seconds: float = DEFAULT_BATCH_SECONDS,
    threads: int = 1,
    force: bool = False,
    progress: bool = False,
) -> TokenizeResult:
    """Tokenise every file of `source` (folder or manifest) into Parquet shards under `out`.

    workers: local processes (1 runs in this process), or Ray Data actors with `use_ray`.
    threads: torch threads per worker. Shards already on disk are skipped (same inputs and model only).
    """
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise CodecError(
            "tokenize writes Parquet and needs pyarrow: pip install 'simvq-codec[ray]' (or just pyarrow)"
        ) from None
    if workers < 1 or shard_size < 1 or batch_seconds <= 0:
        raise CodecError("--workers and --shard-size must be at least 1 and --batch-seconds positive")
    items = load_inputs(source)
    out = Path(out)
    index = _index(model, n_stages, shard_size, items, str(source))
    _check_index(out, index, force)
    metadata = {
        k: index[k]
        for k in (
            "format",
            "model_id",
            "weights_sha256",
            "sample_rate",
            "hop_length",
            "frame_rate",
            "n_stages",
            "codebook_size",
            "codebook_sizes",
        )
    }
    shards = [list(items[i : i + shard_size]) for i in range(0, len(items), shard_size)]
    pending = {s: members for s, members in enumerate(shards) if not shard_path(out, s).exists()}
    result = TokenizeResult(files=len(items), shards=len(shards), shards_skipped=len(shards) - len(pending))
    t0 = time.perf_counter()
    if pending:
        options = dict(
            model=model, device=device, n_stages=index["n_stages"], threads=threads, batch_seconds=batch_seconds
        )
        run = _run_ray if use_ray else _run_local
        with _Progress(sum(len(m) for m in pending.values()), progress) as bar:
            for shard, results in run(pending, options, workers, ray_address, progress):
                write_shard(out, shard, results, metadata)
                result.shards_written += 1
                for r in results:
                    if isinstance(r, Encoded):
                        result.encoded += 1
                        result.audio_seconds += r.duration
                    else:
                        result.failed += 1
                bar.update(results)
    result.wall_seconds = time.perf_counter() - t0
    result.errors = _collect_errors(out, len(shards))
    return result


@dataclass(frozen=True)
class StageUse:
    """One stage's codebook use over a token folder: `used` of `size` codes picked at least once, and the
    entropy of the code histogram in bits (at most log2 `size`; what an entropy coder would spend a code)."""

    size: int
    used: int
    entropy_bits: float

    @property
    def share(self) -> float:
        return self.used / self.size


def code_use(out: str | os.PathLike) -> tuple[int, list[StageUse]]:
    """(frames, per-stage use) over every shard of a token folder, from the codes and the shards' metadata."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    shards = sorted(Path(out).glob("shard-*.parquet"))
    if not shards:
        raise CodecError(f"{out}: no token shards")
    sizes = json.loads(pq.read_schema(shards[0]).metadata[b"simvq"])["codebook_sizes"]
    counts = [np.zeros(k, np.int64) for k in sizes]
    for shard in shards:
        stages = pc.list_flatten(pq.read_table(shard, columns=["codes"])["codes"])  # one row per (file, stage)
        frames = pc.list_value_length(stages).to_numpy()
        values = pc.list_flatten(stages).to_numpy().astype(np.int64)
        stage_of = np.repeat(np.arange(len(frames)) % len(sizes), frames)
        for s, k in enumerate(sizes):
            counts[s] += np.bincount(values[stage_of == s], minlength=k)
    frames = int(counts[0].sum())
    use = []
    for k, c in zip(sizes, counts):
        p = c[c > 0] / max(frames, 1)
        use.append(StageUse(size=k, used=int((c > 0).sum()), entropy_bits=float(-(p * np.log2(p)).sum())))
    return frames, use


def _collect_errors(out: Path, n_shards: int) -> list[tuple[str, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p) for s in range(n_shards) if (p := error_path(out, s)).exists()]
    table = pa.concat_tables(tables) if tables else error_table([])
    _write_atomic(table, out / "errors.parquet")
    return list(zip(table.column("path").to_pylist(), table.column("reason").to_pylist()))


class _Progress:
    """tqdm over files, showing audio hours done."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, unit="file", desc="tokenize", disable=not enabled, file=sys.stderr, dynamic_ncols=True
        )
        self.hours = 0.0

    def update(self, results: Sequence[Encoded | Failed]) -> None:
        self.hours += sum(r.duration for r in results if isinstance(r, Encoded)) / 3600
        self.bar.set_postfix_str(f"{self.hours:.2f} h audio", refresh=False)
        self.bar.update(len(results))

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


class _Buckets:
    """Collects results per shard and hands out a shard once all its files are in."""

    def __init__(self, pending: dict[int, list[Item]]) -> None:
        self.expected = {s: len(m) for s, m in pending.items()}
        self.shard_of = {item.index: s for s, members in pending.items() for item in members}
        self.got: dict[int, list[Encoded | Failed]] = {s: [] for s in pending}

    def add(self, results: Iterable[Encoded | Failed]) -> Iterator[tuple[int, list[Encoded | Failed]]]:
        touched = set()
        for r in results:
            s = self.shard_of[r.item.index]
            self.got[s].append(r)
            touched.add(s)
        for s in sorted(touched):
            if len(self.got[s]) == self.expected[s]:
                yield s, self.got.pop(s)


# --- local worker pool -------------------------------------------------------------------------------
_WORKER: Tokenizer | None = None


def _init_worker(options: dict[str, Any]) -> None:
    global _WORKER
    _WORKER = Tokenizer(**options)


def _work(chunk: list[Item]) -> list[Encoded | Failed]:
    assert _WORKER is not None
    return _WORKER(chunk)


def _run_local(
    pending: dict[int, list[Item]], options: dict[str, Any], workers: int, _address: str | None, _progress: bool
) -> Iterator[tuple[int, list[Encoded | Failed]]]:
    """Chunks of files through `workers` processes (spawned, each loading the model once), or in this process."""
    buckets = _Buckets(pending)
    chunks = [members[i : i + CHUNK_FILES] for members in pending.values() for i in range(0, len(members), CHUNK_FILES)]
    if workers == 1:
        tokenizer = Tokenizer(**options)
        for chunk in chunks:
            yield from buckets.add(tokenizer(chunk))
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    window = 4 * workers  # chunks in flight: keeps workers busy without holding the whole corpus in memory
    with ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(options,)
    ) as pool:
        todo = iter(chunks)
        running = set()
        while True:
            while len(running) < window and (chunk := next(todo, None)) is not None:
                running.add(pool.submit(_work, chunk))
            if not running:
                break
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                yield from buckets.add(future.result())


# --- Ray Data ----------------------------------------------------------------------------------------
class RayTokenizer:
    """The `map_batches` callable class: one model per Ray actor; a pyarrow batch of files in, results out."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.tokenizer = Tokenizer(**options)

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        cols = batch.to_pydict()
        items = [Item(i, p, k, s) for i, p, k, s in zip(cols["index"], cols["path"], cols["key"], cols["speaker"])]
        results = self.tokenizer(items)
        ok = [isinstance(r, Encoded) for r in results]
        empty = np.zeros((0, 0), np.uint16)
        return pa.table(
            {
                "index": pa.array(cols["index"], pa.int64()),
                "duration": pa.array([r.duration if o else 0.0 for r, o in zip(results, ok)], pa.float64()),
                "codes": _codes_array([r.codes if o else empty for r, o in zip(results, ok)]),
                "reason": pa.array([None if o else r.reason for r, o in zip(results, ok)], pa.string()),
            }
        )


def _run_ray(
    pending: dict[int, list[Item]], options: dict[str, Any], workers: int, address: str | None, progress: bool
) -> Iterator[tuple[int, list[Encoded | Failed]]]:
    """Ray Data: `map_batches` over an actor pool (GPU per actor when the cluster has GPUs)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise CodecError("--ray needs Ray: pip install 'simvq-codec[ray]'") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        gpus = ray.cluster_resources().get("GPU", 0)
        device = options["device"]
        use_gpu = gpus >= 1 and device in ("auto", "cuda") or device.startswith("cuda")
        options = {**options, "device": "cuda" if use_gpu else "cpu"}
        by_index = {item.index: item for members in pending.values() for item in members}
        rows = [{"index": i.index, "path": i.path, "key": i.key, "speaker": i.speaker} for i in by_index.values()]
        blocks = min(len(rows), max(2 * workers, -(-len(rows) // CHUNK_FILES)))  # every actor gets work
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        ds = ds.map_batches(
            RayTokenizer,
            fn_constructor_kwargs={"options": options},
            batch_size=CHUNK_FILES,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=max(1, options["threads"]),
            num_gpus=1 if use_gpu else 0,
        )
        buckets = _Buckets(pending)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            cols = batch.to_pydict()
            results: list[Encoded | Failed] = []
            for i, duration, codes, reason in zip(cols["index"], cols["duration"], cols["codes"], cols["reason"]):
                item = by_index[i]
                if reason is None:
                    results.append(Encoded(item, duration, np.asarray(codes, dtype=np.uint16).reshape(len(codes), -1)))
                else:
                    results.append(Failed(item, reason))
            yield from buckets.add(results)
    finally:
        if started:
            ray.shutdown()


# --- command line ------------------------------------------------------------------------------------
EPILOG = """examples:
  simvq-codec tokenize LibriTTS/train-clean-100 --out tokens/ --workers 2
  simvq-codec tokenize corpus/train.csv --out tokens/ --bitrate 3
  simvq-codec tokenize /shared/corpus --out /shared/tokens --ray --workers 16   # on a Ray cluster
rerunning the same command skips the shards already written"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `tokenize` subcommand (entry point of group `simvq_codec.commands`)."""
    p = subparsers.add_parser(
        "tokenize",
        help="audio folder or manifest -> sharded Parquet token tables (local pool or Ray Data)",
        description="Tokenise a corpus into Parquet shards (path, speaker, duration, codes) plus an error table.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="folder of wav/flac/ogg files, or a manifest (CSV with a path column, or a list)")
    p.add_argument("--out", required=True, help="output folder (created; a rerun resumes it)")
    p.add_argument("--model", metavar="ID|DIR", help="model id or directory (default: simvq-16k)")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--stages", type=int, metavar="N", help="residual stages to keep (default: all)")
    rate.add_argument("--bitrate", type=float, metavar="KBPS", help="the most stages within this kbit/s")
    p.add_argument("--workers", type=int, default=1, help="local processes, or Ray actors with --ray (default: 1)")
    p.add_argument("--ray", action="store_true", help="run on Ray Data (RAY_ADDRESS or --ray-address, else local)")
    p.add_argument("--ray-address", help="Ray cluster to join, e.g. ray://head:10001 or auto")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: CUDA when present)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help=f"files per shard ({DEFAULT_SHARD_SIZE})")
    p.add_argument(
        "--batch-seconds",
        type=float,
        default=DEFAULT_BATCH_SECONDS,
        help=f"padded audio seconds per forward pass ({DEFAULT_BATCH_SECONDS:g})",
    )
    p.add_argument("--worker-threads", type=int, default=1, help="torch threads per worker (default: 1)")
    p.add_argument("--force", action="store_true", help="delete shards made with other inputs or model, start over")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_tokenize)


def cmd_tokenize(args: argparse.Namespace) -> int:
    n_stages = args.stages
    if args.bitrate is not None:  # the model is loaded only to turn a bitrate into stages
        from codec.presets import load_model

        n_stages = resolve_stages(load_model(args.model, warn=False).model, n_stages, args.bitrate)
    result = tokenize(
        args.input,
        args.out,
        model=args.model,
        n_stages=n_stages,
        workers=args.workers,
        use_ray=args.ray,
        ray_address=args.ray_address,
        device=args.device,
        shard_size=args.shard_size,
        batch_seconds=args.batch_seconds,
        threads=args.worker_threads,
        force=args.force,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    if not args.quiet:
        print(
            f"{args.out}: {result.shards} shards ({result.shards_written} written, {result.shards_skipped} "
            f"already there); {result.encoded} files encoded, {result.failed} failed "
            f"({len(result.errors)} in errors.parquet); {result.audio_seconds / 3600:.3f} h audio in "
            f"{result.wall_seconds:.1f} s = {result.speed:.0f} audio hours per hour",
            file=sys.stderr,
        )
        if result.encoded or result.shards_skipped:
            frames, use = code_use(args.out)
            print(f"codebook use over {frames} frames (used / codes, entropy):", file=sys.stderr)
            for s, u in enumerate(use, start=1):
                print(
                    f"  stage {s:2d}: {u.used} / {u.size} ({100 * u.share:.1f}%), {u.entropy_bits:.2f} "
                    f"of {np.log2(u.size):.0f} bits",
                    file=sys.stderr,
                )
    return 0
