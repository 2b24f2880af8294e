"""The corpus recipe on generated audio in temporary folders: no Debian speech package is needed."""

import io
import random
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from codec.errors import AudioError
from codec.manifest import read_manifest, read_rows
from training import corpus
from training.corpus import (
    SOURCES,
    Item,
    assign_splits,
    build_corpus,
    choose_dev_groups,
    find_asterisk,
    find_codec2,
    find_megaglest,
    find_telephone,
    find_tuxpaint,
    find_warzone2100,
    kind_table,
    load_item,
    plan_split,
    process_item,
    resample,
    select_sources,
    split_long,
    to_mono,
    trim_silence,
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
    speakers = {
        "asterisk-en-allison": "asterisk-allison",
        "asterisk-es-allison": "asterisk-allison",
        "asterisk-fr-june": "asterisk-june",
    }
    assert assign_splits(speakers, {"asterisk-allison"}) == {
        "asterisk-en-allison": "dev",
        "asterisk-es-allison": "dev",
        "asterisk-fr-june": "train",
    }


def test_plan_split_holds_out_preferred_voices_and_never_synthetic_ones():
    def item(speaker, group, source):
        return Item(("x",), speaker, group, source, "xx", "n")

    items = [
        item("asterisk-en-allison", "asterisk-allison", "asterisk"),
        item("asterisk-es-allison", "asterisk-allison", "asterisk"),
        item("asterisk-fr-june", "asterisk-june", "asterisk"),
        item("asterisk-it-carlo", "asterisk-carlo", "asterisk"),
        item("espeak-en-m1", "espeak-en-m1", "espeak"),
        item("espeak-fr-f2", "espeak-fr-f2", "espeak"),
    ]
    splits = plan_split(items)
    assert splits["asterisk-fr-june"] == splits["asterisk-it-carlo"] == "dev"
    assert splits["asterisk-en-allison"] == splits["asterisk-es-allison"] == "train"
    assert splits["espeak-en-m1"] == splits["espeak-fr-f2"] == "train"
    assert plan_split(list(reversed(items))) == splits


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
    for folder in ("en_US_f_Allison", "es_MX_f_Allison", "fr_CA_f_June", "it_IT_f_Menardi"):
        (tmp_path / folder / "digits").mkdir(parents=True)
        (tmp_path / folder / "silence").mkdir()
        for name in ("vm-intro", "beep", "digits/1", "silence/1"):
            (tmp_path / folder / f"{name}.g722").write_bytes(b"\0" * 16)
    (tmp_path / "en").mkdir()  # the language symlink folders are not voices
    items = find_asterisk(tmp_path)
    assert {(i.speaker, i.group, i.language) for i in items} == {
        ("asterisk-en-allison", "asterisk-allison", "en-US"),
        ("asterisk-es-allison", "asterisk-allison", "es-MX"),
        ("asterisk-fr-june", "asterisk-june", "fr-CA"),
    }
    assert sorted({i.name for i in items}) == ["digits_1", "vm_intro"]
    assert all(i.decoder == "g722" for i in items)


def test_find_tuxpaint_reads_the_language_from_the_name(tmp_path):
    folder = tmp_path / "animals" / "cats"
    folder.mkdir(parents=True)
    for name in ("cat_desc.ogg", "cat_desc_fr.ogg", "cat_desc_pt_BR.wav", "cat.ogg", "cat.txt"):
        (folder / name).write_bytes(b"")
    items = {(i.speaker, i.language, i.name) for i in find_tuxpaint(tmp_path)}
    assert items == {
        ("tuxpaint-en", "en", "animals_cats_cat"),
        ("tuxpaint-fr", "fr", "animals_cats_cat"),
        ("tuxpaint-pt_br", "pt-BR", "animals_cats_cat"),
    }


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
def test_g722_batch_decoding_isolates_a_bad_file(tmp_path):
    src = tmp_path / "tone.wav"
    sf.write(src, tone(1.0, 500.0), SR, subtype="PCM_16")
    good = tmp_path / "good.g722"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(src), "-c:a", "g722", "-f", "g722", str(good)],
        check=True,
    )
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
            wav = np.concatenate(
                [silence(0.6, 44100), tone(0.8, 200.0 + 50 * i + rng.uniform(0, 20), 44100), silence(0.6, 44100)]
            )
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
    rows = read_rows(out / "manifest.csv")
    assert len(rows) == 12 and rows == report.rows
    splits = {r.speaker: r.split for r in rows}
    assert splits == {"klettres-en": "train", "klettres-fr": "train", "klettres-he": "dev", "klettres-hu": "dev"}
    assert read_rows(out / "train.csv") == [r for r in rows if r.split == "train"]
    assert read_rows(out / "dev.csv") == [r for r in rows if r.split == "dev"]
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


# --- the out-of-domain dev set and the sources beside the corpus ------------------------------------
def write_tone(path: Path, seconds: float, rate: int, freq: float = 300.0, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.concatenate([silence(0.2, rate), tone(seconds, freq, rate), silence(0.2, rate)]), rate, **kwargs)


def test_plan_split_puts_ood_voices_in_dev_ood_only():
    def item(speaker, group, source):
        return Item(("x",), speaker, group, source, "en", "n")

    items = [
        item("megaglest-en-commondata-archer", "megaglest-glest", "megaglest"),
        item("megaglest-en-magic-initiate", "megaglest-glest", "megaglest"),
        item("megaglest-en-egypt-mummy", "megaglest-egypt", "megaglest"),
        item("megaglest-en-norsemen-valkyrie", "megaglest-norsemen", "megaglest"),
        item("telephone-es-july", "telephone-es-july", "telephone"),
        item("fotaq-en-joe", "fotaq-en-joe", "fotaq"),
        item("asterisk-fr-june", "asterisk-june", "asterisk"),
        item("asterisk-en-allison", "asterisk-allison", "asterisk"),
    ]
    splits = plan_split(items)
    assert splits == {
        "megaglest-en-commondata-archer": "dev-ood",
        "megaglest-en-magic-initiate": "dev-ood",
        "megaglest-en-egypt-mummy": "train",
        "megaglest-en-norsemen-valkyrie": "train",
        "telephone-es-july": "dev-ood",
        "fotaq-en-joe": "train",
        "asterisk-fr-june": "dev",
        "asterisk-en-allison": "train",
    }
    assert plan_split(list(reversed(items))) == splits


def test_ood_pieces_are_cut_to_15_s_and_short_ones_dropped(tmp_path):
    long_file, short_file = tmp_path / "long.wav", tmp_path / "short.wav"
    write_tone(long_file, 40.0, 8000)
    write_tone(short_file, 0.6, 8000)
    result = process_item(
        Item((str(long_file),), "codec2-en-x", "g", "codec2", "en", "long", min_rate=8000),
        tmp_path / "out",
        seconds=(1.0, 15.0),
    )
    assert result.dropped is None and len(result.pieces) == 4  # a steady tone is cut 5 s before each limit
    assert all(1.0 <= seconds <= 15.0 for _, seconds in result.pieces)
    assert sum(seconds for _, seconds in result.pieces) == pytest.approx(40.2, abs=0.05)  # tone + 0.1 s margins
    assert sf.info(tmp_path / "out" / result.pieces[0][0]).samplerate == SR  # 8 kHz upsampled, kept narrowband
    short = process_item(
        Item((str(short_file),), "codec2-en-y", "g", "codec2", "en", "short", min_rate=8000),
        tmp_path / "out",
        seconds=(1.0, 15.0),
    )
    assert short.dropped == "shorter than 1.0 s" and not short.pieces


def test_find_megaglest_keeps_speech_and_groups_factions(tmp_path):
    files = [
        "factions/magic/units/initiate/sounds/initiate_ack1.wav",
        "factions/magic/units/initiate/sounds/initiate_select2.wav",
        "factions/egypt/units/mummy/sounds/mummy_ack1.wav",
        "factions/egypt/units/mummy/sounds/mummy_die1.wav",  # a death cry: not speech
        "factions/egypt/units/chicken/sounds/chicken_ack1.wav",  # an animal
        "commondata/sounds/technician_ack1.wav",
        "commondata/sounds/technician_ack2.wav",
        "commondata/sounds/pig_select1.wav",
        "commondata/sounds/arrow_hit1.wav",
    ]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    for i in range(3, 7):
        (tmp_path / f"commondata/sounds/technician_select{i}.wav").write_bytes(b"")
    items = find_megaglest(tmp_path)
    summary = sorted((i.speaker, i.group, len(i.src)) for i in items)
    assert summary == [
        ("megaglest-en-commondata-technician", "megaglest-glest", 2),
        ("megaglest-en-commondata-technician", "megaglest-glest", 4),
        ("megaglest-en-egypt-mummy", "megaglest-egypt", 1),
        ("megaglest-en-magic-initiate", "megaglest-glest", 2),
    ]
    assert plan_split(items)["megaglest-en-commondata-technician"] == "dev-ood"


def test_find_telephone_takes_a_fixed_sample_of_sentences(tmp_path):
    folder = tmp_path / "es"
    (folder / "digits").mkdir(parents=True)
    for i in range(corpus.TELEPHONE_PER_VOICE + 20):
        (folder / f"prompt-{i:03d}.gsm").write_bytes(b"")
    (folder / "beep.gsm").write_bytes(b"")
    (folder / "digits" / "1.gsm").write_bytes(b"")
    (tmp_path / "fr_CA_f_June").mkdir()
    (tmp_path / "fr").symlink_to(tmp_path / "fr_CA_f_June")  # a core sound set's language link, not Armelle
    items = find_telephone(tmp_path)
    assert len(items) == corpus.TELEPHONE_PER_VOICE
    assert {(i.speaker, i.language, i.min_rate) for i in items} == {("telephone-es-july", "es-CO", 8000)}
    assert all(i.name.startswith("prompt") for i in items)
    (folder / "prompt-999.gsm").write_bytes(b"")  # another file does not reshuffle the sample
    again = {i.name for i in find_telephone(tmp_path)}
    assert len(again & {i.name for i in items}) >= corpus.TELEPHONE_PER_VOICE - 1


def test_find_codec2_skips_coded_and_joined_files(tmp_path):
    for name in ("forig", "f2400", "all", "hts1a", "wia_16kHz"):
        (tmp_path / f"{name}.wav").write_bytes(b"")
    assert sorted(i.speaker for i in find_codec2(tmp_path)) == ["codec2-en-forig", "codec2-en-hts1a"]


def test_warzone_voices_are_read_inside_the_archive(tmp_path):
    buffer = io.BytesIO()
    sf.write(buffer, tone(1.5, 400.0, 11025), 11025, format="OGG", subtype="VORBIS")
    with zipfile.ZipFile(tmp_path / "base.wz", "w") as zf:
        for name in (
            "audio/tutorial/tut1.ogg",
            "audio/tutorial/tut2.ogg",
            "audio/taunts/taunt1/a.ogg",
            "audio/taunts/taunt1/b.ogg",
            "audio/sfx/weapons/gun.ogg",
        ):
            zf.writestr(name, buffer.getvalue())
    items = find_warzone2100(tmp_path)
    assert [(i.speaker, i.name, len(i.src)) for i in items] == [
        ("warzone2100-en-tutorial", "tut1", 1),
        ("warzone2100-en-tutorial", "tut2", 1),
        ("warzone2100-en-taunt1", "a_b", 2),
    ]
    wav, reason = load_item(items[2])
    assert reason is None and abs(len(wav) / SR - (1.5 + 0.15 + 1.5)) < 0.05  # two clips and a pause
    assert corpus.deduplicate(items)[1] == 1  # tut2 repeats tut1's bytes


def test_queen_table_and_drascula_speech_decode(tmp_path):
    clip = io.BytesIO()
    sf.write(clip, tone(1.0, 300.0, 11025), 11025, format="WAV", subtype="PCM_16")
    data = clip.getvalue()
    name = b"020006J1.SB".ljust(12, b"\0")
    table_start = 15 + 21
    archive = tmp_path / "queen.1c"
    archive.write_bytes(
        b"QTBL"
        + b"CEM10\0"
        + b"\0\0"
        + b"\1"
        + (1).to_bytes(2, "big")
        + name
        + b"\1"
        + table_start.to_bytes(4, "big")
        + len(data).to_bytes(4, "big")
        + data
    )
    items = corpus.find_fotaq(tmp_path)
    assert [(i.speaker, i.decoder) for i in items] == [("fotaq-en-joe", "queen")]
    wav, reason = load_item(items[0])
    assert reason is None and abs(len(wav) / SR - 1.0) < 0.03
    pcm = np.round(tone(2.0, 300.0, 11025, 0.5) * 127 + 128).astype(np.uint8)
    pad = np.full(corpus.ALS_PAD, 255, np.uint8)  # not audio: the engine skips it
    (tmp_path / "VB3.ALS").write_bytes(np.concatenate([pad, pcm, pad]).tobytes())
    (drascula,) = corpus.find_drascula(tmp_path)
    wav, reason = load_item(drascula)
    assert drascula.speaker == "drascula-en-vb" and reason is None
    assert abs(len(wav) / SR - 2.0) < 0.03 and np.max(np.abs(wav)) == pytest.approx(0.5, abs=0.02)


def test_build_writes_a_dev_ood_manifest_the_readers_accept(tmp_path):
    make_klettres_tree(tmp_path / "klettres")
    for name, seconds in (("forig", 3.0), ("hts1a", 20.0), ("big_dog", 0.5)):
        write_tone(tmp_path / "codec2" / f"{name}.wav", seconds, 8000)
    out = tmp_path / "corpus"
    report = build_corpus(
        out,
        [SOURCES["klettres"], SOURCES["codec2"]],
        roots={"klettres": tmp_path / "klettres", "codec2": tmp_path / "codec2"},
        progress=False,
    )
    ood = read_rows(out / "dev-ood.csv")
    assert sorted((r.speaker, round(r.duration)) for r in ood) == [
        ("codec2-en-forig", 3),
        ("codec2-en-hts1a", 10),
        ("codec2-en-hts1a", 10),
    ]  # 20 s cut below 15 s
    assert {(r.split, r.kind, r.source) for r in ood} == {("dev-ood", "telephone", "codec2")}
    assert {r.kind for r in report.rows if r.source == "klettres"} == {"read"}
    assert not {r.speaker for r in ood} & {r.speaker for r in read_rows(out / "train.csv")}
    assert report.dropped["shorter than 1.0 s"] == 1  # big_dog, too short for the out-of-domain set
    listed = read_manifest(out / "dev-ood.csv")  # the files training and evaluation take
    assert [(i.speaker, i.split) for i in listed] == [(r.speaker, "dev-ood") for r in ood]
    assert all(i.path.is_file() for i in listed)
    table = kind_table(report.rows)
    assert "| telephone  |      2 | en " in table and "|      3 |" in table


def test_select_sources_expands_default_in_a_list():
    names = [s.name for s in select_sources(["default", "fotaq"])]
    assert names == [s.name for s in SOURCES.values() if s.default] + ["fotaq"]
    assert "asterisk-nb" not in SOURCES  # reserved for independent evaluation
    assert "ffmpeg" in SOURCES["asterisk"].packages  # --install brings the G.722 decoder
    with pytest.raises(AudioError, match="unknown source"):
        select_sources(["default", "nope"])


def test_find_redeclipse_joins_taunts_per_voice(tmp_path):
    for folder, names in (("voice", ["haha", "haha2", "no", "sorry"]), ("announcer", ["fight"]), ("player", ["pain"])):
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / f"{name}.ogg").write_bytes(b"")
    items = corpus.find_redeclipse(tmp_path)
    assert [(i.speaker, i.name, len(i.src)) for i in items] == [
        ("redeclipse-en-player", "haha_haha2_no", 3),
        ("redeclipse-en-player", "sorry", 1),
        ("redeclipse-en-announcer", "fight", 1),
    ]
    assert {plan_split(items)[i.speaker] for i in items} == {"dev-ood"}
