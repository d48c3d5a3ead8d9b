"""Plain, loop-based reference implementations the tests compare against (slow on purpose)."""
import math

import torch


def window_entries(layout, bev_pos, cam_pos, bev_window, cam_window, b, q):
    """Sorted list of (key, source, dy, dx) in the windows of query (b, q)."""
    out = []

    def size_of(window):
        return int(window[b, q]) if isinstance(window, torch.Tensor) else int(window)

    if bev_pos is not None:
        row, col = (int(v) for v in bev_pos[b, q])
        r = size_of(bev_window) // 2
        if row >= 0 and size_of(bev_window) > 0:
            h, w = layout.bev_shape
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    y, x = row + dy, col + dx
                    if 0 <= y < h and 0 <= x < w:
                        out.append((y * w + x, 0, dy, dx))
    if cam_pos is not None:
        slots = cam_pos[b, q] if cam_pos.dim() == 4 else cam_pos[b, q].unsqueeze(0)
        r = size_of(cam_window) // 2
        for view, row, col in slots.tolist():
            if view < 0 or size_of(cam_window) == 0:
                continue
            _, hc, wc = layout.cam_shape
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    y, x = row + dy, col + dx
                    if 0 <= y < hc and 0 <= x < wc:
                        out.append((layout.num_bev_keys + view * hc * wc + y * wc + x, 1, dy, dx))
    return sorted(out)


def dense_bias(layout, bev_pos, cam_pos, bev_window, cam_window, bev_weight, cam_weight, scale=1.0,
               profile="flat", sigma=None):
    """[B, Q, K] or [B, H, Q, K] float64 bias, filled entry by entry."""
    batch, queries = bev_weight.shape[:2] if bev_weight is not None else cam_weight.shape[:2]
    heads = None
    for w in (bev_weight, cam_weight):
        if w is not None and w.dim() == 3:
            heads = w.shape[2]
    out = torch.zeros(batch, heads or 1, queries, layout.num_keys, dtype=torch.float64)

    def size_of(window):
        return int(window[b, q]) if isinstance(window, torch.Tensor) else int(window)

    for b in range(batch):
        for q in range(queries):
            for key, source, dy, dx in window_entries(layout, bev_pos, cam_pos, bev_window, cam_window, b, q):
                w = (bev_weight if source == 0 else cam_weight)[b, q].double()
                f = 1.0
                if profile == "gaussian":
                    if sigma is None:
                        s = max(size_of(bev_window if source == 0 else cam_window) // 2, 1) / 2
                    else:
                        s = sigma[source] if isinstance(sigma, (tuple, list)) else sigma
                    f = math.exp(-(dy * dy + dx * dx) / (2 * s * s))
                out[b, :, q, key] = w * float(scale) * f
    return out[:, 0] if heads is None else out
