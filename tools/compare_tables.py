"""Compare the CSV outputs of two `make demo` runs (two checkouts): every CSV under
results/demo/, per file the largest relative difference over the numeric cells of the
columns both runs have, the text cells that differ, and the columns only one run has.

Usage: python tools/compare_tables.py CHECKOUT_A CHECKOUT_B [--cohort demo]

Used to show that a change of code layout left the results alone (docs/development.md
records the comparisons made with it)."""
import argparse
import glob
import os

import numpy as np
import pandas as pd


def compare(a: pd.DataFrame, b: pd.DataFrame) -> tuple[float, str | None, list, list]:
    """(largest relative difference, its column, text columns that differ, columns only
    in a or b) of two tables with the same rows."""
    worst, where, text = 0.0, None, []
    for c in [c for c in a.columns if c in b.columns]:
        x, y = a[c], b[c]
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            x, y = x.to_numpy(float), y.to_numpy(float)
            if (np.isnan(x) != np.isnan(y)).any():
                text.append(f"{c} (empty cells)")
                continue
            ok = ~np.isnan(x)
            scale = np.maximum(np.abs(x), np.abs(y))[ok]
            rel = np.abs(x - y)[ok] / np.where(scale > 0, scale, 1.0)
            if rel.size and rel.max() > worst:
                worst, where = float(rel.max()), c
        elif not x.fillna("").astype(str).equals(y.fillna("").astype(str)):
            text.append(c)
    only = [c for c in a.columns if c not in b.columns] + [c for c in b.columns
                                                             if c not in a.columns]
    return worst, where, text, only


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--cohort", default="demo")
    args = ap.parse_args()
    root = f"results/{args.cohort}"
    files = sorted({os.path.relpath(f, args.a) for f in
                    glob.glob(f"{args.a}/{root}/**/*.csv", recursive=True)})
    overall = 0.0
    for rel in files:
        fb = os.path.join(args.b, rel)
        if not os.path.exists(fb):
            print(f"{rel}: only in {args.a}")
            continue
        a, b = pd.read_csv(os.path.join(args.a, rel)), pd.read_csv(fb)
        if len(a) != len(b):
            print(f"{rel}: {len(a)} rows against {len(b)}")
            continue
        worst, where, text, only = compare(a, b)
        overall = max(overall, worst)
        print(f"{rel}: largest relative difference {worst:.2g}"
              + (f" ({where})" if where else "")
              + (f"; text differs: {text}" if text else "")
              + (f"; columns in one run only: {only}" if only else ""))
    print(f"{len(files)} files; largest relative difference {overall:.2g}")


if __name__ == "__main__":
    main()
