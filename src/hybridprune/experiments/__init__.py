"""experiments: the top of the library, where the parts below become runs, grids of runs, and their reports.

One concept per module, each importing only those listed before it (and the layers below `experiments`):

- `inputs`: what a job starts from: seeded data subsets, the configured model, a dense checkpoint that fits.
- `job`: the staged job (dense -> filter step -> fine-tune -> N:M -> fine-tune, per metric), resumable step by
  step from its output folder; `run` is the whole job, as `hybridprune run` does it.
- `store`: the SQLite result store of grids, its columns declared once, and the keys of runs and baselines.
- `runner`: one grid point per worker call (plain data in, a store row out), and the pools that run them.
- `grid`: a grid read from YAML (`load_grid`) and run into a store (`run_grid`).
- `statistics`, `tables`, `plots`, `report`: numbers from stored rows, their Markdown tables, their figures,
  and the grid report that puts them together. These read results only; they never train or measure.
"""
