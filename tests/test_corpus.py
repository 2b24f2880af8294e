"""The corpus recipe on generated audio in temporary folders: no Debian speech package is needed."""

import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from codec.errors import AudioError
from training import corpus
from training.corpus import (
    SOURCES,
    Item,
    ManifestRow,
    assign_splits,
    build_corpus,
    choose_dev_groups,
    find_asterisk,
    find_tuxpaint,
    load_item,
    plan_split,
    read_manifest,
    resample,
    split_long,
    to_mono,
    trim_silence,
    write_manifest,
)

SR = 16000


def tone(seconds: float, freq: float = 440.0, rate: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def silence(seconds: float, rate: int = SR) -> np.ndarray:
    return np.zeros(int(seconds * rate), np.float32)


# --- split ------------------------------------------------------------------------------------------
GROUPS = {
    "asterisk": ["asterisk-allison", "asterisk-june", "asterisk-carlo", "asterisk-ivrvoiceru"],
    "klettres": ["klettres-en", "klettres-fr", "klettres-he", "klettres-hu", "klettres-de"],
}


def test_dev_groups_are_deterministic_whatever_the_input_order():
    preferred = {"asterisk": ("asterisk-june",), "klettres": ("klettres-he", "klettres-cs")}
    min_dev = {"asterisk": 1, "klettres": 3}
    first = choose_dev_groups(GROUPS, preferred, min_dev)
    rng = random.Random(0)
    for _ in range(5):
        shuffled = {k: rng.sample(v, len(v)) for k, v in reversed(list(GROUPS.items()))}
        assert choose_dev_groups(shuffled, preferred, min_dev) == first
    # preferred groups that are present are taken; klettres-cs is absent, so two more come from the hash order
    assert "asterisk-june" in first and "klettres-he" in first
    assert len([g for g in first if g.startswith("klettres")]) == 3
    assert len([g for g in first if g.startswith("asterisk")]) == 1


def test_dev_never_takes_every_voice_of_a_source():
    dev = choose_dev_groups({"asterisk": ["asterisk-june"]}, {"asterisk": ("asterisk-june",)}, {"asterisk": 1})
    assert dev == set()
    dev = choose_dev_groups({"k": ["a", "b", "c"]}, {}, {"k": 5})
    assert len(dev) == 2


def test_speakers_of_one_person_share_a_split():
    speakers = {"asterisk-en-allison": "asterisk-allison", "asterisk-es-allison": "asterisk-allison",
                "asterisk-fr-june": "asterisk-june"}
    assert assign_splits(speakers, {"asterisk-allison"}) == {
        "asterisk-en-allison": "dev", "asterisk-es-allison": "dev", "asterisk-fr-june": "train"}


def test_plan_split_holds_out_preferred_voices_and_never_synthetic_ones():
    def item(speaker, group, source):
        return Item(("x",), speaker, group, source, "xx", "n")

    items = [item("asterisk-en-allison", "asterisk-allison", "asterisk"),
             item("asterisk-es-allison", "asterisk-allison", "asterisk"),
             item("asterisk-fr-june", "asterisk-june", "asterisk"),
             item("asterisk-it-carlo", "asterisk-carlo", "asterisk"),
             item("espeak-en-m1", "espeak-en-m1", "espeak"),
             item("espeak-fr-f2", "espeak-fr-f2", "espeak")]
    splits = plan_split(items)
    assert splits["asterisk-fr-june"] == splits["asterisk-it-carlo"] == "dev"
    assert splits["asterisk-en-allison"] == splits["asterisk-es-allison"] == "train"
    assert splits["espeak-en-m1"] == splits["espeak-fr-f2"] == "train"
    assert plan_split(list(reversed(items))) == splits


# --- manifest ---------------------------------------------------------------------------------------
def test_manifest_round_trip(tmp_path):
    rows = [ManifestRow("wav/b/2.wav", "b", 2.5, "dev", "klettres", "fr"),
            ManifestRow("wav/a/1.wav", "a", 1.25, "train", "asterisk", "en-US")]
    assert write_manifest(tmp_path / "m.csv", rows) == 2
    text = (tmp_path / "m.csv").read_text().splitlines()
    assert text[0] == "path,speaker,duration,split,source,language"
    assert text[1] == "wav/a/1.wav,a,1.250,train,asterisk,en-US"  # sorted by path
    assert read_manifest(tmp_path / "m.csv") == sorted(rows, key=lambda r: r.path)


@pytest.mark.parametrize("body, message", [
    ("path,speaker\nx.wav,a\n", "header"),
    ("path,speaker,duration,split,source,language\nx.wav,a,abc,train,s,en\n", "not a number"),
    ("path,speaker,duration,split,source,language\nx.wav,a,-1,train,s,en\n", "positive"),
    ("path,speaker,duration,split,source,language\nx.wav,a,1.0,test,s,en\n", "split"),
    ("path,speaker,duration,split,source,language\nx.wav,a,1.0,train\n", "columns"),
    ("path,speaker,duration,split,source,language\n/abs.wav,a,1.0,train,s,en\n", "relative"),
])
def test_malformed_manifest_names_the_problem(tmp_path, body, message):
    (tmp_path / "m.csv").write_text(body)
    with pytest.raises(AudioError, match=message):
        read_manifest(tmp_path / "m.csv")


def test_missing_manifest(tmp_path):
    with pytest.raises(AudioError, match="no manifest"):
        read_manifest(tmp_path / "absent.csv")


# --- signal processing ------------------------------------------------------------------------------
def test_trim_silence_keeps_speech_and_a_margin():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 1e-4, int(3.0 * SR)).astype(np.float32)
    wav = np.concatenate([silence(1.0), tone(0.5), silence(1.5)]) + noise
    out = trim_silence(wav, margin=0.1)
    assert abs(len(out) / SR - 0.7) < 0.02  # 0.5 s tone + 0.1 s each side (to the 10 ms frame)
    assert np.max(np.abs(out)) == pytest.approx(np.max(np.abs(wav)))  # the tone is untouched


def test_trim_silence_leaves_short_pauses_and_empties_silence():
    wav = np.concatenate([silence(0.05), tone(0.5), silence(0.05)])
    assert len(trim_silence(wav, margin=0.1)) == len(wav)
    assert len(trim_silence(silence(1.0))) == 0


def test_split_long_cuts_at_pauses_and_covers_everything():
    rng = np.random.default_rng(1)
    speech = lambda s: rng.normal(0, 0.2, int(s * SR)).astype(np.float32)  # noqa: E731
    wav = np.concatenate([speech(27.0), silence(0.5), speech(26.0), silence(0.5), speech(10.0)])
    pieces = split_long(wav, max_seconds=30.0)
    assert len(pieces) == 3
    assert all(len(p) <= 30 * SR for p in pieces)
    assert np.array_equal(np.concatenate(pieces), wav)
    first_cut, second_cut = len(pieces[0]) / SR, (len(pieces[0]) + len(pieces[1])) / SR
    assert 27.0 <= first_cut <= 27.5 and 53.5 <= second_cut <= 54.0  # inside the pauses


def test_split_long_without_pauses_still_respects_the_limit():
    wav = np.random.default_rng(2).normal(0, 0.2, 95 * SR).astype(np.float32)
    pieces = split_long(wav, max_seconds=30.0)
    assert all(len(p) <= 30 * SR for p in pieces) and sum(map(len, pieces)) == len(wav)
    short = wav[: 10 * SR]
    assert len(split_long(short)) == 1 and split_long(short)[0] is short


def test_resample_and_mix_down_a_generated_44k_stereo_file(tmp_path):
    rate = 44100
    left, right = tone(2.0, 1000.0, rate, 0.5), tone(2.0, 1000.0, rate, 0.3)
    path = tmp_path / "stereo.ogg"
    sf.write(path, np.stack([left, right], axis=1), rate, format="OGG", subtype="VORBIS")
    wav, reason = load_item(Item((str(path),), "s", "s", "klettres", "en", "stereo"))
    assert reason is None
    assert abs(len(wav) - 2 * SR) <= 2 * 160  # trimming works in 10 ms frames
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    assert np.fft.rfftfreq(len(wav), 1 / SR)[np.argmax(spectrum)] == pytest.approx(1000.0, abs=2.0)
    assert np.max(np.abs(wav)) == pytest.approx(0.4, abs=0.03)  # the mean of the two channels


def test_to_mono_and_resample_shapes():
    stereo = np.stack([np.ones(100), -np.ones(100)], axis=1)
    assert np.allclose(to_mono(stereo), 0.0)
    out = resample(tone(1.0, 440.0, 22050), 22050)
    assert len(out) == SR and out.dtype == np.float32


def test_narrowband_files_are_dropped(tmp_path):
    path = tmp_path / "nb.wav"
    sf.write(path, tone(1.0, 300.0, 8000), 8000)
    wav, reason = load_item(Item((str(path),), "s", "s", "ktuberling", "en", "nb"))
    assert len(wav) == 0 and reason == "below 16000 Hz"


# --- sources ----------------------------------------------------------------------------------------
def test_find_asterisk_names_voices_and_skips_non_speech(tmp_path):
    for folder in ("en_US_f_Allison", "es_MX_f_Allison", "fr_CA_f_June"):
        (tmp_path / folder / "digits").mkdir(parents=True)
        (tmp_path / folder / "silence").mkdir()
        for name in ("vm-intro", "beep", "digits/1", "silence/1"):
            (tmp_path / folder / f"{name}.g722").write_bytes(b"\0" * 16)
    (tmp_path / "en").mkdir()  # the language symlink folders are not voices
    items = find_asterisk(tmp_path)
    assert {(i.speaker, i.group, i.language) for i in items} == {
        ("asterisk-en-allison", "asterisk-allison", "en-US"),
        ("asterisk-es-allison", "asterisk-allison", "es-MX"),
        ("asterisk-fr-june", "asterisk-june", "fr-CA")}
    assert sorted({i.name for i in items}) == ["digits_1", "vm_intro"]
    assert all(i.decoder == "g722" for i in items)


def test_find_tuxpaint_reads_the_language_from_the_name(tmp_path):
    folder = tmp_path / "animals" / "cats"
    folder.mkdir(parents=True)
    for name in ("cat_desc.ogg", "cat_desc_fr.ogg", "cat_desc_pt_BR.wav", "cat.ogg", "cat.txt"):
        (folder / name).write_bytes(b"")
    items = {(i.speaker, i.language, i.name) for i in find_tuxpaint(tmp_path)}
    assert items == {("tuxpaint-en", "en", "animals_cats_cat"), ("tuxpaint-fr", "fr", "animals_cats_cat"),
                     ("tuxpaint-pt_br", "pt-BR", "animals_cats_cat")}


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_g722_batch_decoding_isolates_a_bad_file(tmp_path):
    src = tmp_path / "tone.wav"
    sf.write(src, tone(1.0, 500.0), SR, subtype="PCM_16")
    good = tmp_path / "good.g722"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(src), "-c:a", "g722", "-f", "g722",
                    str(good)], check=True)
    empty = tmp_path / "empty.g722"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.g722"
    out = corpus.decode_g722([str(good), str(missing), str(empty)])
    assert set(out) == {str(good), str(empty)} and len(out[str(empty)]) == 0
    assert abs(len(out[str(good)]) - SR) < 50 and np.max(np.abs(out[str(good)])) > 0.3


# --- the whole recipe on a fake KLettres tree -------------------------------------------------------
def make_klettres_tree(root: Path) -> None:
    rng = np.random.default_rng(3)
    for lang in ("en", "fr", "he", "hu"):
        folder = root / lang / "alpha"
        folder.mkdir(parents=True)
        for i in range(3):
            wav = np.concatenate([silence(0.6, 44100), tone(0.8, 200.0 + 50 * i + rng.uniform(0, 20), 44100),
                                  silence(0.6, 44100)])
            sf.write(folder / f"{i}.ogg", np.stack([wav, wav], axis=1), 44100, format="OGG", subtype="VORBIS")
    shutil.copy(root / "fr" / "alpha" / "0.ogg", root / "fr" / "alpha" / "copy.ogg")  # a duplicate
    sf.write(root / "en" / "alpha" / "short.ogg", tone(0.1, 300.0, 44100), 44100, format="OGG", subtype="VORBIS")
    sf.write(root / "en" / "alpha" / "nb.wav", tone(1.0, 300.0, 8000), 8000)  # ignored: not .ogg


def test_build_corpus_end_to_end(tmp_path):
    make_klettres_tree(tmp_path / "src")
    out = tmp_path / "corpus"
    report = build_corpus(out, [SOURCES["klettres"]], jobs=1, roots={"klettres": tmp_path / "src"}, progress=False)
    assert report.duplicates == 1
    assert report.dropped == {"shorter than 0.3 s": 1}
    rows = read_manifest(out / "manifest.csv")
    assert len(rows) == 12 and rows == report.rows
    splits = {r.speaker: r.split for r in rows}
    assert splits == {"klettres-en": "train", "klettres-fr": "train", "klettres-he": "dev", "klettres-hu": "dev"}
    assert read_manifest(out / "train.csv") == [r for r in rows if r.split == "train"]
    assert read_manifest(out / "dev.csv") == [r for r in rows if r.split == "dev"]
    for r in rows:
        info = sf.info(out / r.path)
        assert (info.samplerate, info.channels, info.subtype) == (SR, 1, "PCM_16")
        assert r.path.startswith(f"wav/{r.speaker}/") and r.language == r.speaker.split("-")[1]
        assert abs(r.duration - 1.0) < 0.03  # 0.8 s tone + 0.1 s margins: the long silences are gone
        assert info.frames == round(r.duration * SR)


def test_cli_refuses_to_overwrite_and_rejects_unknown_sources(tmp_path, capsys):
    (tmp_path / "manifest.csv").write_text("x")
    assert corpus.main(["--out", str(tmp_path), "--sources", "klettres", "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err
    assert corpus.main(["--out", str(tmp_path), "--sources", "nope"]) == 2
    assert "unknown source" in capsys.readouterr().err
