"""Tests of the isoform FASTA/TSV reader for ESM2 gene embeddings (vcc_dist.esm.fasta)."""

from __future__ import annotations

import gzip
import re

import pytest

from vcc_dist.esm.fasta import (
    ESM_ALPHABET,
    FastaError,
    Isoform,
    ParseReport,
    genes_of,
    read_isoforms,
    write_fasta_simple,
)

ENSEMBL = (
    ">ENSP00000000001.1 pep chromosome:SIM:6:1:2:1 gene:ENSG00000000001.1 "
    "transcript:ENST00000000001.1 gene_biotype:protein_coding transcript_biotype:protein_coding "
    "gene_symbol:GENE00001 description:some gene gene:ENSG99999999999 [Source:HGNC]\n"
    "MKTAYIAKQR\nQISFVKSHFS\nRQ\n"
    ">ENSP00000000002.1 pep chromosome:SIM:6:1:2:1 gene:ENSG00000000001.1 "
    "transcript:ENST00000000002.1 gene_biotype:protein_coding gene_symbol:GENE00001\n"
    "MKTAYIAKQRQ\n"
    ">ENSP00000000003.2 pep chromosome:SIM:7:1:2:1 gene:ENSG00000000002.4 "
    "transcript:ENST00000000003.2 gene_biotype:protein_coding\n"
    "MSEQ\n"
)

UNIPROT = (
    ">sp|P04637|P53_HUMAN Cellular tumor antigen p53 OS=Homo sapiens OX=9606 GN=TP53 PE=1 SV=4\n"
    "MEEPQSDPSV\nEPPLSQETFS\n"
    ">sp|P04637-2|P53_HUMAN Isoform 2 of Cellular tumor antigen p53 OS=Homo sapiens OX=9606 GN=TP53\n"
    "MEEPQSDPSVEPPL\n"
    ">tr|A0A024R161|A0A024R161_HUMAN Guanine nucleotide-binding protein OS=Homo sapiens OX=9606 "
    "GN=DNAJC25-GNG10 PE=3 SV=1\n"
    "MGAPLLSPGWGAGAAGRRWWMLLAPLLPALLLVRPAGALVEGLYCGTRDCYEVLGVSRSAGKAEIARAYRQLARRYHPDRYRPQPGDEGPGRT\n"
)


def _write(path, text):
    path.write_text(text)
    return path


def _pipe(*records):
    return "".join(f">{h}\n{s}\n" for h, s in records)


# ------------------------------------------------------------------------------------------------
# header conventions


def test_ensembl_headers(tmp_path):
    isos, rep = read_isoforms(_write(tmp_path / "pep.fa", ENSEMBL))
    assert [(i.gene, i.isoform) for i in isos] == [
        ("GENE00001", "ENSP00000000001.1"), ("GENE00001", "ENSP00000000002.1"),
        ("ENSG00000000002", "ENSP00000000003.2")]  # no gene_symbol: gene id without version
    assert isos[0].sequence == "MKTAYIAKQRQISFVKSHFSRQ" and isos[0].length == 22
    assert rep.header_format == "ensembl" and rep.genes_without_symbol == 1
    assert (rep.n_records, rep.n_isoforms, rep.n_genes) == (3, 3, 2)
    assert list(genes_of(isos)) == ["GENE00001", "ENSG00000000002"]
    assert [i.isoform for i in genes_of(isos)["GENE00001"]] == ["ENSP00000000001.1",
                                                                 "ENSP00000000002.1"]


def test_uniprot_headers_with_isoform_accessions(tmp_path):
    isos, rep = read_isoforms(_write(tmp_path / "up.fasta", UNIPROT), fmt="uniprot")
    assert [(i.gene, i.isoform) for i in isos] == [
        ("TP53", "P04637"), ("TP53", "P04637-2"), ("DNAJC25-GNG10", "A0A024R161")]
    assert isos[0].sequence == "MEEPQSDPSVEPPLSQETFS"
    assert rep.header_format == "uniprot" and rep.n_genes == 2


def test_uniprot_without_gn_is_a_clear_error(tmp_path):
    p = _write(tmp_path / "up.fa", UNIPROT + ">sp|Q00000|NOGN_HUMAN Something OS=Homo sapiens\nMK\n")
    with pytest.raises(FastaError, match=r"line 8 \(record 'sp\|Q00000\|NOGN_HUMAN'\).*GN=.*"
                                         r"Fix:.*>GENE\|isoform"):
        read_isoforms(p)


def test_pipe_headers_and_mixed_auto_detection(tmp_path):
    text = _pipe(("TP53|TP53-201 free text here", "MEEP"), ("BRCA1|BRCA1-1", "MDLS")) + ENSEMBL
    isos, rep = read_isoforms(_write(tmp_path / "mixed.fa", text))
    assert [(i.gene, i.isoform) for i in isos][:2] == [("TP53", "TP53-201"), ("BRCA1", "BRCA1-1")]
    assert rep.header_format == "mixed"
    assert rep.format_counts == {"pipe": 2, "ensembl": 3}
    # an explicit format requires every header to follow it
    with pytest.raises(FastaError, match=r"line 5 .*ENSP00000000001\.1.*not '>GENE\|isoform'"):
        read_isoforms(tmp_path / "mixed.fa", fmt="pipe")


def test_unrecognised_header_names_the_record_and_fix(tmp_path):
    p = _write(tmp_path / "bad.fa", _pipe(("A|a1", "MK"), ("P04637 no gene here", "MK")))
    with pytest.raises(FastaError, match=r"bad\.fa, line 3 \(record 'P04637'\).*Fix: rewrite"):
        read_isoforms(p)


def test_gzip_is_read_transparently(tmp_path):
    p = tmp_path / "pep.fa.gz"
    with gzip.open(p, "wt") as fh:
        fh.write(ENSEMBL)
    isos, rep = read_isoforms(p)
    assert len(isos) == 3 and rep.header_format == "ensembl"
    assert isos == read_isoforms(_write(tmp_path / "pep.fa", ENSEMBL))[0]


@pytest.mark.parametrize("name,sep", [("iso.tsv", "\t"), ("iso.csv", ","), ("iso.tsv.gz", "\t")])
def test_table_input(tmp_path, name, sep):
    rows = [["isoform", "gene", "sequence", "note"], ["TP53-201", "TP53", "meep qsd*", "x"],
            ["TP53-202", "TP53", "MEEPQ", ""], ["GATA1-1", "GATA1", "MEFPG", "y"]]
    text = "\n".join(sep.join(r) for r in rows) + "\n"
    p = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(p, "wt") as fh:
            fh.write(text)
    else:
        p.write_text(text)
    isos, rep = read_isoforms(p)
    assert isos[0] == Isoform("TP53", "TP53-201", "MEEPQSD")
    assert [i.gene for i in isos] == ["TP53", "TP53", "GATA1"]
    assert rep.header_format == "tsv" and rep.stop_codons_stripped == 1 and rep.n_genes == 2


def test_table_by_fmt_and_missing_columns(tmp_path):
    p = _write(tmp_path / "iso.txt", "gene\tisoform\tsequence\nA\ta1\tMK\n")
    assert read_isoforms(p, fmt="tsv")[0] == [Isoform("A", "a1", "MK")]
    bad = _write(tmp_path / "bad.tsv", "gene\tprotein\tsequence\nA\ta1\tMK\n")
    with pytest.raises(FastaError, match=r"line 1.*lacks column.*isoform.*Fix"):
        read_isoforms(bad)


def test_non_fasta_file_is_a_clear_error(tmp_path):
    p = _write(tmp_path / "notes.txt", "\nthis is not a fasta file\nMKV\n")
    with pytest.raises(FastaError, match=r"notes\.txt, line 2: not a FASTA file.*Fix"):
        read_isoforms(p)
    tsv_like = _write(tmp_path / "table.txt", "gene\tisoform\tsequence\nA\ta1\tMK\n")
    with pytest.raises(FastaError, match=r"fmt='tsv'"):
        read_isoforms(tsv_like)
    binary = tmp_path / "x.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(FastaError, match="not a text file"):
        read_isoforms(binary)
    with pytest.raises(FastaError, match="no records"):
        read_isoforms(_write(tmp_path / "empty.fa", "\n\n"))


def test_bad_arguments(tmp_path):
    p = _write(tmp_path / "a.fa", ">A|a\nMK\n")
    with pytest.raises(ValueError, match="fmt='fastq'"):
        read_isoforms(p, fmt="fastq")
    with pytest.raises(ValueError, match="on_duplicate='last'"):
        read_isoforms(p, on_duplicate="last")
    with pytest.raises(FileNotFoundError):
        read_isoforms(tmp_path / "missing.fa")


# ------------------------------------------------------------------------------------------------
# sequences


def test_multiline_whitespace_case_stop_and_nonstandard(tmp_path):
    text = (">A|a1\nmkt ay\n  iak\t\r\nqr*\n\n"  # lower case, blanks, CRLF, stop
            ">A|a2\nMK*QR-J.1\n"                  # internal stop, gap, J, '.', digit -> 5 X
            ">B|b1\nMBUZOX\n")                    # ESM extra tokens are kept
    isos, rep = read_isoforms(_write(tmp_path / "s.fa", text))
    assert [i.sequence for i in isos] == ["MKTAYIAKQR", "MKXQRXXXX", "MBUZOX"]
    assert rep.stop_codons_stripped == 1
    assert rep.nonstandard == 5 and rep.nonstandard_examples == ["a2"]
    assert all(set(i.sequence) <= set(ESM_ALPHABET) for i in isos)


def test_nonstandard_examples_are_capped(tmp_path):
    text = _pipe(*[(f"G|i{k}", "MJJ") for k in range(15)])
    _, rep = read_isoforms(_write(tmp_path / "s.fa", text))
    assert rep.nonstandard == 30 and len(rep.nonstandard_examples) == 10


def test_empty_sequences_are_dropped_and_reported(tmp_path):
    text = ">A|a1\n>A|a2\nMK\n>B|b1\n*\n>C|c1\n"
    isos, rep = read_isoforms(_write(tmp_path / "e.fa", text))
    assert [i.isoform for i in isos] == ["a2"]
    assert rep.empty == ["a1", "b1", "c1"] and rep.n_records == 4 and rep.n_genes == 1
    with pytest.raises(FastaError, match="all 2 records have an empty sequence"):
        read_isoforms(_write(tmp_path / "all_empty.fa", ">A|a1\n>B|b1\n\n"))


# ------------------------------------------------------------------------------------------------
# duplicates


def test_identical_duplicates_dropped(tmp_path):
    text = _pipe(("A|a1", "MKV"), ("A|a2", "MK"), ("A|a1 again", "mk\nv"))
    isos, rep = read_isoforms(_write(tmp_path / "d.fa", text))
    assert [i.isoform for i in isos] == ["a1", "a2"] and rep.duplicates_dropped == 1


def test_conflicting_duplicates_error_or_keep_first(tmp_path):
    p = _write(tmp_path / "d.fa", _pipe(("A|a1", "MKV"), ("A|a2", "MK"), ("A|a1", "MKW")))
    with pytest.raises(FastaError, match=r"line 5 \(record 'a1'\): a different sequence.*line 1.*"
                                         r"on_duplicate='keep-first'"):
        read_isoforms(p)
    isos, rep = read_isoforms(p, on_duplicate="keep-first")
    assert [(i.isoform, i.sequence) for i in isos] == [("a1", "MKV"), ("a2", "MK")]
    assert rep.conflicts_dropped == 1 and rep.duplicates_dropped == 0


def test_same_isoform_under_two_genes_is_an_error(tmp_path):
    p = _write(tmp_path / "d.fa", _pipe(("A|x1", "MKV"), ("B|x1", "MKV")))
    for mode in ("error", "keep-first"):
        with pytest.raises(FastaError, match=r"line 3 \(record 'x1'\).*'B'.*'A' \(line 1\)"):
            read_isoforms(p, on_duplicate=mode)


# ------------------------------------------------------------------------------------------------
# round trip, report, simulator


def test_write_fasta_simple_round_trip(tmp_path):
    isos = [Isoform("A", "a1", "M" * 130), Isoform("B", "b1", "MKV")]
    for name in ("rt.fa", "rt.fa.gz"):
        assert write_fasta_simple(isos, tmp_path / name) == 2
        back, rep = read_isoforms(tmp_path / name)
        assert back == isos and rep.header_format == "pipe"
    lines = (tmp_path / "rt.fa").read_text().splitlines()
    assert lines[:4] == [">A|a1", "M" * 60, "M" * 60, "M" * 10]
    with pytest.raises(ValueError, match="'a b'"):
        write_fasta_simple([Isoform("A", "a b", "MK")], tmp_path / "bad.fa")


def test_report_to_dict(tmp_path):
    _, rep = read_isoforms(_write(tmp_path / "a.fa", ">A|a\nMK*\n"))
    d = rep.to_dict()
    assert isinstance(rep, ParseReport) and d["path"] == str(tmp_path / "a.fa")
    assert d["stop_codons_stripped"] == 1 and d["empty"] == [] and d["n_isoforms"] == 1


def test_simulator_fasta(tmp_path):
    from vcc_dist.data.simulate import sim_config, simulate

    sim = simulate(sim_config("tiny", seed=1), tmp_path, progress=False)
    text = sim.fasta_path.read_text()
    symbols = re.findall(r"gene_symbol:(\S+)", text)
    isos, rep = read_isoforms(sim.fasta_path)
    assert rep.header_format == "ensembl" and rep.genes_without_symbol == 0
    assert rep.n_isoforms == text.count(">") == len(isos)
    assert rep.n_genes == len(set(symbols))
    by_gene = genes_of(isos)
    assert list(by_gene) == list(dict.fromkeys(symbols))  # file order
    assert any(len(v) > 1 for v in by_gene.values())
    assert rep.nonstandard == 0 and rep.empty == [] and rep.duplicates_dropped == 0
