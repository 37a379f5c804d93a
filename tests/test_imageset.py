"""Host-side image storage (neurimg.imageset) and batch drawing (neurimg.sampler)."""

import numpy as np
import pytest

from neurimg import imageset, sampler
from neurimg.coords import image_grid
from neurimg.data import read_image
from neurimg.errors import NeurimgError
from neurimg.imageset import ImageSet, load_image_set

from conftest import write_png


def _folder(tmp_path, n=6, seed=0):
    rng = np.random.default_rng(seed)
    d = tmp_path / "imgs"
    d.mkdir()
    shapes = [(5, 7), (8, 8), (3, 11), (6, 4), (9, 2), (4, 4)]
    for k in range(n):
        h, w = shapes[k % len(shapes)]
        write_png(d / f"im{k:02d}.png", rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
    return d


def test_store_is_uint8_and_exact(tmp_path):
    d = _folder(tmp_path)
    s = load_image_set([str(d)])
    assert s.store.dtype == np.uint8 and len(s) == 6
    assert s.nbytes == sum(w * h * 3 for w, h in s.sizes) + 8 * (2 * 6 + 7)  # pixels + sizes + offsets
    for k, f in enumerate(sorted(d.iterdir())):
        np.testing.assert_array_equal(s.image(k), read_image(f))  # 8-bit: exactly the decoder's floats
        assert s.names[k] == f.name and tuple(s.sizes[k]) == (s.image(k).shape[1], s.image(k).shape[0])


def test_rgba_gray_and_16_bit_sources(tmp_path):
    """RGBA is composited then rounded (within half a step); a 16-bit PNG makes the store
    uint16, exact for it and for the 8-bit images (x257)."""
    rng = np.random.default_rng(1)
    d = tmp_path / "m"
    d.mkdir()
    write_png(d / "a_rgba.png", rng.integers(0, 256, size=(4, 5, 4), dtype=np.uint8))
    write_png(d / "b_gray.png", rng.integers(0, 256, size=(3, 3), dtype=np.uint8))
    s8 = load_image_set([str(d)])
    assert s8.store.dtype == np.uint8
    assert np.abs(s8.image(0) - read_image(d / "a_rgba.png")).max() <= 0.5 / 255 + 1e-7
    np.testing.assert_array_equal(s8.image(1), read_image(d / "b_gray.png"))
    import png  # pypng writes true 16-bit RGB

    v16 = rng.integers(0, 65536, size=(2, 3, 3), dtype=np.uint16)
    with open(d / "c16.png", "wb") as f:
        png.Writer(3, 2, greyscale=False, bitdepth=16).write(f, v16.reshape(2, -1).tolist())
    s = load_image_set([str(d)])
    assert s.store.dtype == np.uint16 and s.scale == 65535
    np.testing.assert_array_equal(s.store[s.offsets[2] : s.offsets[3]], v16.reshape(-1, 3))
    np.testing.assert_array_equal(s.image(1), read_image(d / "b_gray.png"))


def test_process_pool_gives_the_same_set_and_reports_progress(tmp_path, monkeypatch):
    d = _folder(tmp_path, n=12)
    serial = load_image_set([str(d)], workers=1)
    monkeypatch.setattr(imageset, "_POOL_MIN_FILES", 0)
    monkeypatch.setattr(imageset, "_TASK_FILES", 5)
    seen = []
    pooled = load_image_set([str(d)], workers=2, progress=lambda phase, done, total: seen.append((done, total)))
    np.testing.assert_array_equal(pooled.store, serial.store)
    np.testing.assert_array_equal(pooled.offsets, serial.offsets)
    assert seen[0] == (0, 12) and seen[-1] == (12, 12) and [a for a, _ in seen] == sorted(a for a, _ in seen)


def test_bad_file_in_a_pooled_folder_is_one_clear_error(tmp_path, monkeypatch):
    d = _folder(tmp_path, n=8)
    (d / "im03.png").write_bytes(b"not a png at all")
    monkeypatch.setattr(imageset, "_POOL_MIN_FILES", 0)
    monkeypatch.setattr(imageset, "_TASK_FILES", 2)
    with pytest.raises(NeurimgError, match="im03.png: not a readable image"):
        load_image_set([str(d)], workers=2)


def test_shares_split_the_folder(tmp_path):
    d = _folder(tmp_path, n=7)
    whole = load_image_set([str(d)])
    parts = [load_image_set([str(d)], share=(p, 3)) for p in range(3)]
    assert [len(p) for p in parts] == [2, 2, 3] and [p.first_id for p in parts] == [0, 2, 4]
    assert sum((p.names for p in parts), []) == whole.names
    np.testing.assert_array_equal(np.concatenate([p.store for p in parts]), whole.store)


def _set(sizes, seed=0):
    rng = np.random.default_rng(seed)
    ims = [rng.integers(0, 256, size=(h, w, 3)).astype(np.float32) / 255 for w, h in sizes]
    return ImageSet.from_arrays([f"{k}" for k in range(len(ims))], ["-"] * len(ims), ims), ims


def test_plan_chooses_images_and_points():
    sizes = np.array([[64, 64]] * 48)
    p = sampler.plan_batches(sizes, 8192, 0)
    assert (p.images, p.points, p.full, p.every_image) == (48, 170, False, True)
    big = np.array([[64, 64]] * 100_000)
    p = sampler.plan_batches(big, 8192, 0)
    assert (p.images, p.points, p.every_image) == (128, 64, False)  # 64 pixels per image
    p = sampler.plan_batches(big, 0, 0)
    assert (p.images, p.points, p.full, p.static) == (256, 4096, True, False)  # 2^20 points
    p = sampler.plan_batches(np.array([[256, 256]]), 0, 0, point_multiple=3)
    assert (p.images, p.points, p.drawn, p.static) == (1, 65538, 65536, True)
    p = sampler.plan_batches(sizes, 8192, 10, processes=4, local_counts=[12] * 4)
    assert p.images == 12 and p.images % 4 == 0  # 3 per process
    p = sampler.plan_batches(np.array([[4, 4]] * 3), 1000, 0)
    assert p.full and p.points == 16  # more pixels asked for than exist: all of them


def test_draws_match_the_images_and_the_grid():
    s, ims = _set([(7, 5), (4, 9), (6, 6)])
    plan = sampler.plan_batches(s.sizes, 60, -1, point_multiple=4)  # all 3 images, 20 points each
    draw = sampler.Sampler(s, plan, 3, seed=0)
    b = draw.batch(5)
    assert b["slot"].tolist() == [0, 1, 2] and plan.drawn == 20 and plan.points == 20
    for k, im in enumerate(ims):
        grid = image_grid(im.shape[1], im.shape[0]).reshape(-1, 2)
        # each drawn point's coordinate is a pixel centre, and its colour that pixel's
        assert b["coords"].shape == (3, 20, 1, 2)  # one point per pixel: its centre
        idx = [int(np.argmin(np.abs(grid - c).sum(1))) for c in b["coords"][k, :, 0]]
        np.testing.assert_allclose(b["coords"][k, :, 0], grid[idx], atol=1e-6)
        np.testing.assert_allclose(b["colors"][k, :, 0] / 255.0, im.reshape(-1, 3)[idx], atol=1e-6)
    assert (b["denom"] == 60).all() and (b["weight"] == 1).all() and (b["area"] == 1).all()
    again = sampler.Sampler(s, plan, 3, seed=0).batch(5)  # depends only on (seed, step)
    for key in b:
        np.testing.assert_array_equal(again[key], b[key])
    assert not np.array_equal(draw.batch(6)["coords"], b["coords"])


def test_epochs_visit_every_image_once():
    s, _ = _set([(3, 3)] * 10)
    plan = sampler.plan_batches(s.sizes, 12, 4)
    assert (plan.images, plan.every_image) == (4, False)
    draw = sampler.Sampler(s, plan, 10, seed=3)
    for epoch in range(2):  # 3 steps per epoch: 4 + 4 + 2 (two padding slots)
        slots = np.concatenate([draw.batch(epoch * 3 + i)["slot"] for i in range(3)])
        real = slots[slots < 10]
        assert sorted(real.tolist()) == list(range(10)) and (slots == 10).sum() == 2
    padded = draw.batch(2)
    assert padded["valid"].tolist() == [1, 1, 0, 0] and padded["weight"][2:].sum() == 0


def test_process_share_ids_are_global():
    s, _ = _set([(3, 3)] * 4)
    s.first_id = 4  # the second half of an 8-image run
    plan = sampler.plan_batches(np.array([[3, 3]] * 8), 0, 0, processes=2, local_counts=[4, 4])
    draw = sampler.Sampler(s, plan, 8, seed=0, process=(1, 2))
    assert draw.batch(0)["slot"].tolist() == [4, 5, 6, 7]
    stacked = draw.batches(0, 1, 3)
    assert stacked["coords"].shape == (3, 4, 9, 1, 2) and (stacked["weight"][1:] == 0).all()


def test_load_progress_lines_when_not_a_terminal(tmp_path):
    import io

    from rich.console import Console

    from neurimg.progress import CountProgress

    buf = io.StringIO()
    prog = CountProgress(console=Console(file=buf, force_terminal=False, width=200), min_total=5)
    load_image_set([str(_folder(tmp_path, n=6))], progress=prog)
    assert buf.getvalue().strip().splitlines()[-1] == "decoding: 6/6 images"
    quiet = io.StringIO()
    small = CountProgress(console=Console(file=quiet, force_terminal=False), min_total=1000)
    small("decoding", 6, 6)
    assert quiet.getvalue() == ""  # small folders load silently


def test_edge_map_by_hand():
    im = np.zeros((3, 4, 3))
    im[:, 2:, 0] = 1.0  # a vertical edge in red between columns 1 and 2
    g = sampler.edge_map(im)
    # central differences along x: columns 1 and 2 see (1 - 0) / 2; one-sided at the borders: 0
    np.testing.assert_allclose(g, np.tile([0.0, 0.5, 0.5, 0.0], (3, 1)))
    assert sampler.edge_map(np.ones((1, 5, 3))).sum() == 0  # a single row: no y difference


def test_edge_sampling_probabilities_and_weights_by_hand():
    """Drawn frequencies follow q_i = (1 - s)/n + s g_i / sum(g), every weight is 1 / (n q_i),
    so the weighted mean of any per-pixel value estimates its plain mean (unbiased)."""
    a = np.zeros((4, 4, 3))
    a[:, 2:] = 1.0  # an edge: columns 1 and 2 carry gradient
    _, ims = _set([(4, 4), (5, 3)])
    ims = [a, ims[1]]
    s = ImageSet.from_arrays(["a", "b"], ["-", "-"], ims)
    share = 0.6
    plan = sampler.plan_batches(s.sizes, 20, -1)  # 10 points of each image a step
    draw = sampler.Sampler(s, plan, 2, seed=1, edge_share=share)
    assert draw.edges is not None and not plan.full
    steps = 3000
    bt = draw.batches(0, steps, steps)
    for k, im in enumerate(ims):
        h, w = im.shape[:2]
        g = sampler.edge_map(im).reshape(-1)
        n = g.size
        q = (1 - share) / n + share * g / g.sum()
        xy = bt["coords"][:, k].reshape(-1, 2)
        col = np.rint((xy[:, 0] * w + w - 1) / 2).astype(int)
        row = np.rint((xy[:, 1] * w + h - 1) / 2).astype(int)
        idx = row * w + col
        wt = bt["weight"][:, k, :, 0].reshape(-1)
        freq = np.bincount(idx, minlength=n) / len(idx)
        np.testing.assert_allclose(freq, q, atol=5 * np.sqrt(q.max() / len(idx)))
        np.testing.assert_allclose(wt, 1.0 / (n * q[idx]), rtol=1e-6)
        np.testing.assert_allclose(bt["colors"][:, k, :, 0].reshape(-1, 3) / 255.0, im.reshape(-1, 3)[idx], atol=1 / 255)
        value = np.arange(n, dtype=np.float64) ** 2  # any per-pixel quantity
        est = np.mean(wt * value[idx])
        assert abs(est - value.mean()) < 0.03 * value.mean()
    assert bt["weight"].max() <= 1 / (1 - share) + 1e-9
    # a flat image has no edges: uniform draws and unit weights
    flat = ImageSet.from_arrays(["f"], ["-"], [np.full((6, 6, 3), 0.5)])
    d = sampler.Sampler(flat, sampler.plan_batches(flat.sizes, 20, -1), 1, seed=0, edge_share=share)
    np.testing.assert_allclose(d.batch(3)["weight"], 1.0)
    # share 0, a full batch, or too many pixels: no table (uniform draws)
    assert sampler.Sampler(s, plan, 2, seed=1, edge_share=0.0).edges is None
    assert sampler.Sampler(s, sampler.plan_batches(s.sizes, 0, -1), 2, seed=1, edge_share=share).edges is None


def test_edge_table_size_limit(monkeypatch):
    s, _ = _set([(4, 4), (5, 3)])
    monkeypatch.setattr(sampler, "EDGE_MAX_PIXELS", 30)
    assert sampler.edge_table(s, 0.5) is None
    monkeypatch.setattr(sampler, "EDGE_MAX_PIXELS", 31)
    t = sampler.edge_table(s, 0.5)
    assert t.shape == (31,) and t[15] == 1.0 and t[-1] == 2.0 and np.all(np.diff(t) > 0)


@pytest.mark.parametrize("full", [False, True])
def test_area_observation_points_cover_each_pixel_stratified(full):
    """supersample m: each drawn pixel is observed at m x m points inside its own square, one in
    each sub-square, at its centre, minibatch or full batch alike (not jittered: that blurs the
    sharp image); the colour is still that pixel's."""
    m = 3
    s, ims = _set([(7, 5), (4, 9)])
    plan = sampler.plan_batches(s.sizes, 0 if full else 40, -1)
    draw = sampler.Sampler(s, plan, 2, seed=0, supersample=m)
    b = draw.batch(3)
    assert b["coords"].shape == (2, plan.points, m * m, 2)
    for k, im in enumerate(ims):
        h, w = im.shape[:2]
        xy = b["coords"][k]  # (P, S, 2)
        u = (xy[..., 0] * w + w) / 2  # back to pixel units: x in [0, W), y in [0, H)
        v = (xy[..., 1] * w + h) / 2
        real = b["weight"][k, :, 0] > 0
        col, row = np.floor(u[real]).astype(int), np.floor(v[real]).astype(int)
        assert (col == col[:, :1]).all() and (row == row[:, :1]).all()  # all S points in one pixel
        # one point per sub-square, in row-major order
        fu, fv = (u[real] - col) * m, (v[real] - row) * m
        assert (np.floor(fu) == np.arange(m * m) % m).all() and (np.floor(fv) == np.arange(m * m) // m).all()
        np.testing.assert_allclose(fu % 1, 0.5, atol=1e-4)  # the sub-squares' centres
        np.testing.assert_allclose(fv % 1, 0.5, atol=1e-4)
        idx = row[:, 0] * w + col[:, 0]
        np.testing.assert_allclose(b["colors"][k, :, 0][real] / 255.0, im.reshape(-1, 3)[idx], atol=1e-6)
        assert (b["weight"][k, :, 1:] == 0).all() and (b["area"][k] == 1).all()  # one value per pixel: the lattice's mean
    if not full:
        assert not np.array_equal(draw.batch(4)["coords"], b["coords"])  # other pixels
        np.testing.assert_array_equal(sampler.Sampler(s, plan, 2, seed=0, supersample=m).batch(3)["coords"], b["coords"])
    # m = 1 draws exactly the pixel centres it drew before there was a choice
    one = sampler.Sampler(s, plan, 2, seed=0).batch(3)
    assert one["coords"].shape[2] == 1


def test_uniform_draws_are_without_replacement():
    """Uniform sampling (edge_share 0): no pixel twice in one image's share of a step; where the
    share exceeds the image, every pixel floor(P / n) or ceil(P / n) times. Edge sampling keeps
    its draws with replacement and its importance weights."""
    s, _ = _set([(8, 6), (3, 4)])  # 48 and 12 pixels
    plan = sampler.plan_batches(s.sizes, 2 * 30, -1)  # 30 pixels of each image a step
    assert not plan.full and plan.drawn == 30
    draw = sampler.Sampler(s, plan, 2, seed=0)
    for step in range(5):
        b = draw.batch(step)
        for k, (w, h) in enumerate(s.sizes):
            u = (b["coords"][k, :, 0, 0] * w + w) / 2 - 0.5
            v = (b["coords"][k, :, 0, 1] * w + h) / 2 - 0.5
            idx = np.round(v).astype(int) * w + np.round(u).astype(int)
            counts = np.bincount(idx, minlength=w * h)
            if w * h >= 30:
                assert counts.max() == 1 and len(set(idx)) == 30
            else:  # 30 draws of 12 pixels: each 2 or 3 times
                assert set(counts) <= {2, 3} and counts.sum() == 30
            assert (b["weight"][k] == 1).all()
    assert not np.array_equal(draw.batch(0)["coords"], draw.batch(1)["coords"])
    np.testing.assert_array_equal(sampler.Sampler(s, plan, 2, seed=0).batch(3)["coords"], draw.batch(3)["coords"])


def test_detail_mask_by_hand():
    im = np.zeros((5, 6, 3))
    im[2, 3, 1] = 1.0  # one bright pixel: it and its 8 neighbours have detail
    im[:, :, 2] = 0.5 / 255  # below the level: uint8 rounding is no detail
    mask = sampler.detail_mask(im)
    want = np.zeros((5, 6), bool)
    want[1:4, 2:5] = True
    np.testing.assert_array_equal(mask, want)
    assert not sampler.detail_mask(np.full((3, 3, 3), 0.7)).any()


def _pixels_of(b, k, w, h):
    """(P, S) pixel indices and fractional offsets of slot k's points."""
    xy = b["coords"][k]
    u, v = (xy[..., 0] * w + w) / 2, (xy[..., 1] * w + h) / 2
    col, row = np.floor(u).astype(int), np.floor(v).astype(int)
    return row * w + col, u - col, v - row


@pytest.mark.parametrize("full", [False, True])
def test_detail_pixels_are_areas_and_the_rest_centres(full):
    """area_pixels "detail": an area entry is one detail pixel's m x m lattice, a point entry S
    flat pixels' centres with their own colours; a full batch holds every pixel exactly once, a
    minibatch draws each pixel about equally often, and the weights keep the image's MSE."""
    m = 2
    a = np.zeros((6, 8, 3))
    a[:, 5:] = 1.0  # an edge: columns 4 and 5 have detail, 12 of 48 pixels
    b_img = np.random.default_rng(1).random((5, 7, 3))  # every pixel has detail
    c = np.full((4, 4, 3), 0.25)  # none has
    ims = [a, b_img, c]
    s = ImageSet.from_arrays(["a", "b", "c"], ["-"] * 3, ims)
    plan = sampler.plan_batches(s.sizes, 0 if full else 36, -1)  # 12 entries of each image a step
    draw = sampler.Sampler(s, plan, 3, seed=0, supersample=m, detail=True)
    steps = 1 if full else 2000
    bt = draw.batches(0, steps, steps)
    for k, im in enumerate(ims):
        h, w = im.shape[:2]
        n = h * w
        det = sampler.detail_mask(im).reshape(-1)
        seen = np.zeros(n)
        est, offsets = [], []
        value = np.arange(n, dtype=np.float64) ** 2  # any per-pixel quantity
        for t in range(steps):
            b = {key: v[t] for key, v in bt.items()}
            pix, fu, fv = _pixels_of(b, k, w, h)
            wt, area = b["weight"][k], b["area"][k] > 0
            ar = area & (wt[:, 0] > 0)
            assert (pix[ar] == pix[ar, :1]).all() and det[pix[ar, 0]].all()  # one detail pixel's lattice
            np.testing.assert_allclose(fu[ar] * m % 1, 0.5, atol=1e-4)
            ce = ~area
            real = wt[ce] > 0
            assert not det[pix[ce][real]].any()  # flat pixels, each at a point drawn in its square
            offsets.append(np.stack([fu[ce][real], fv[ce][real]], -1))
            np.testing.assert_allclose(b["colors"][k][ce][real] / 255.0, im.reshape(-1, 3)[pix[ce][real]], atol=1 / 255)
            np.testing.assert_allclose(b["colors"][k, ar, 0] / 255.0, im.reshape(-1, 3)[pix[ar, 0]], atol=1 / 255)
            obs = np.concatenate([pix[ar, 0], pix[ce][real]])
            wts = np.concatenate([wt[ar, 0], wt[ce][real]])
            assert b["denom"][k] == 3 * len(obs)
            np.add.at(seen, obs, 1)
            est.append((wts * value[obs]).sum() / len(obs))
        if full:
            np.testing.assert_array_equal(seen, 1)  # every pixel once, unit weights
            np.testing.assert_allclose(est[0], value.mean())
        else:
            freq = seen / seen.sum()
            np.testing.assert_allclose(freq, 1 / n, rtol=0.35)  # about equally often
            assert abs(np.mean(est) - value.mean()) < 0.02 * value.mean()  # unbiased
        offsets = np.concatenate(offsets)
        if len(offsets) > 100:  # uniform in the square: std 1 / sqrt(12) along each axis
            np.testing.assert_allclose(offsets.std(0), 12**-0.5, atol=0.02)
