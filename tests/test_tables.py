"""tables.py's writers and results.py's readers: the exact bytes of the committed tables' format."""
import numpy as np

from diffdistill import results, tables


def test_write_table_bytes(tmp_path):
    rows = [{"a": 1, "b": "x|y", "c": 0.1}, {"a": "not run", "c": float("nan")}]
    tables.write_table(rows, [("a", "A"), ("b", "B b"), ("c", "C")], tmp_path / "t.md", tmp_path / "t.csv",
                       title="Title.")
    assert (tmp_path / "t.md").read_text() == ("Title.\n\n| A | B b | C |\n| --- | --- | --- |\n"
                                               "| 1 | x\\|y | 0.1 |\n| not run |  | nan |\n")
    assert (tmp_path / "t.csv").read_text() == "a,b,c\n1,x|y,0.1\nnot run,,nan\n"


def test_plot_csv_whole_numbers_as_ints_and_csv_columns_round_trip(tmp_path):
    out = tmp_path / "p.csv"
    rows = tables.write_plot_csv({"step": np.array([1.0, 2.0, 3.0]), "loss": np.array([0.5, 1.0, 0.30000000000000004])},
                                 out)
    assert out.read_text() == "step,loss\n1,0.5\n2,1\n3,0.30000000000000004\n"
    assert rows[1] == {"step": 2, "loss": 1}
    c = results.read_csv_columns(out)
    assert c["loss"].tolist() == [0.5, 1.0, 0.30000000000000004] and c["step"].dtype == float
    (tmp_path / "empty.csv").write_text("step,fid\n")
    assert {k: v.tolist() for k, v in results.read_csv_columns(tmp_path / "empty.csv").items()} == {"step": [], "fid": []}
