"""Pictures and tables of an evaluation: CAM overlay grid, box-accuracy curve, per-image Parquet."""
from __future__ import annotations

from pathlib import Path

import numpy as np

GREEN, RED = (0, 200, 0), (230, 30, 30)  # RGB: ground truth, prediction


def _draw_boxes(tile: np.ndarray, boxes: np.ndarray, color: tuple[int, int, int], scale: int) -> None:
    import cv2

    for x0, y0, x1, y1 in np.asarray(boxes).reshape(-1, 4):
        cv2.rectangle(tile, (int(x0) * scale, int(y0) * scale), (int(x1) * scale + scale - 1, int(y1) * scale + scale - 1),
                      color, max(1, scale // 2))


def overlay_grid(images: np.ndarray, cams: np.ndarray, gt_boxes: list, predicted: np.ndarray | None,
                 captions: list[str], path: Path, columns: int = 4) -> Path:
    """PNG grid: per image, the photo with boxes and the CAM heatmap over it (gt green, predicted red).

    images (N, H, W, 3) uint8 RGB; cams (N, H, W) in [0, 1]; predicted (N, 4) or None.
    """
    import cv2

    count, height, width = cams.shape
    scale = max(1, 192 // max(height, width))  # small synthetic images are enlarged to be seen
    tiles = []
    for i in range(count):
        photo = cv2.resize(images[i], (width * scale, height * scale), interpolation=cv2.INTER_NEAREST)
        heat = cv2.applyColorMap((cams[i] * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
        heat = cv2.resize(heat, (width * scale, height * scale), interpolation=cv2.INTER_NEAREST)
        blend = (0.5 * photo + 0.5 * heat).astype(np.uint8)
        for tile in (photo, blend):
            _draw_boxes(tile, gt_boxes[i], GREEN, scale)
            if predicted is not None:
                _draw_boxes(tile, predicted[i], RED, scale)
        pair = np.concatenate([photo, np.full((photo.shape[0], 4, 3), 255, np.uint8), blend], axis=1)
        caption = np.full((18, pair.shape[1], 3), 255, np.uint8)
        cv2.putText(caption, captions[i][:60], (2, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.pad(np.concatenate([caption, pair]), ((4, 4), (4, 4), (0, 0)), constant_values=255))
    while len(tiles) % columns:
        tiles.append(np.full_like(tiles[0], 255))
    rows = [np.concatenate(tiles[r:r + columns], axis=1) for r in range(0, len(tiles), columns)]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.concatenate(rows)[:, :, ::-1])
    return path


def accuracy_curve_plot(curves: dict[str, np.ndarray], title: str, path: Path) -> Path:
    """PNG of box accuracy (%) against the CAM threshold, one line per IoU threshold and protocol."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    figure = Figure(figsize=(6, 4), dpi=100)
    axis = figure.add_subplot()
    thresholds = curves["cam_threshold"]
    for name, values in curves.items():
        if name == "cam_threshold":
            continue
        label = "MaxBoxAcc (largest contour, IoU 0.5)" if name == "maxboxacc" else \
            f"V2 all contours, IoU 0.{name.rsplit('iou', 1)[1]}"
        best = int(np.argmax(values))
        line, = axis.plot(thresholds, values, label=f"{label}: {values[best]:.1f}")
        axis.plot(thresholds[best], values[best], "o", color=line.get_color())
    axis.set_xlabel("CAM threshold")
    axis.set_ylabel("box accuracy (%)")
    axis.set_ylim(0, 100)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.92)  # tight_layout costs ~50 ms a plot
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def write_predictions(rows: dict[str, np.ndarray], path: Path, **constants) -> Path:
    """The per-image rows as a Parquet file (plus constant columns such as split and epoch)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    count = len(next(iter(rows.values())))
    columns = {name: pa.array(np.asarray(values).tolist() if np.asarray(values).dtype == object else values)
               for name, values in rows.items()}
    for name, value in constants.items():
        columns[name] = pa.array([value] * count)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.table(columns), temporary)
    temporary.replace(path)
    return path
