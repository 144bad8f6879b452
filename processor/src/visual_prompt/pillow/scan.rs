//! Pillow's scanline polygon filler (`polygon_generic` with `add_edge`) and the wide lines
//! built on it (`ImagingDrawWideLine`), in Pillow's `float`/`double` arithmetic.

use super::PillowCanvas;

/// One polygon edge (`Edge` in `Draw.c`).
#[derive(Debug, Clone, Copy)]
struct Edge {
    x0: i64,
    y0: i64,
    xmin: i64,
    ymin: i64,
    xmax: i64,
    ymax: i64,
    /// `dx/dy` as a C `float`.
    dx: f32,
}

impl Edge {
    fn new(x0: i64, y0: i64, x1: i64, y1: i64) -> Self {
        let dx = if y0 == y1 {
            0.0
        } else {
            (x1 - x0) as f32 / (y1 - y0) as f32
        };
        Self {
            x0,
            y0,
            xmin: x0.min(x1),
            ymin: y0.min(y1),
            xmax: x0.max(x1),
            ymax: y0.max(y1),
            dx,
        }
    }

    /// The edge's x at row `y`, as `(y - y0) * dx + x0` in `float`.
    fn x_at(&self, y: i64) -> f32 {
        (y - self.y0) as f32 * self.dx + self.x0 as f32
    }
}

/// `ROUND_UP` on a `float`: half away from zero.
fn round_up_f32(f: f32) -> i64 {
    if f64::from(f) >= 0.0 {
        (f + 0.5).floor() as i64
    } else {
        -((f64::from(f).abs() + 0.5).floor() as i64)
    }
}

/// `ROUND_DOWN` on a `float`: half toward zero.
fn round_down_f32(f: f32) -> i64 {
    if f64::from(f) >= 0.0 {
        (f - 0.5).ceil() as i64
    } else {
        -((f64::from(f).abs() - 0.5).ceil() as i64)
    }
}

/// `ROUND_UP` on a `double`.
fn round_up_f64(f: f64) -> i64 {
    if f >= 0.0 {
        (f + 0.5).floor() as i64
    } else {
        -((f.abs() + 0.5).floor() as i64)
    }
}

/// `ROUND_DOWN` on a `double`.
fn round_down_f64(f: f64) -> i64 {
    if f >= 0.0 {
        (f - 0.5).ceil() as i64
    } else {
        -((f.abs() - 0.5).ceil() as i64)
    }
}

/// `ImagingDrawWideLine`: the segment's rectangle, `width` pixels across, as a polygon.
pub(super) fn wide_line(canvas: &mut PillowCanvas, p0: (i64, i64), p1: (i64, i64), width: i64) {
    let (x0, y0) = p0;
    let (x1, y1) = p1;
    let dx = x1 - x0;
    let dy = y1 - y0;
    if dx == 0 && dy == 0 {
        canvas.point(x0, y0);
        return;
    }
    let big = (dx as f64).hypot(dy as f64);
    let small = (width - 1) as f64 / 2.0;
    let ratio_max = round_up_f64(small) as f64 / big;
    let ratio_min = round_down_f64(small) as f64 / big;
    let dxmin = round_down_f64(ratio_min * dy as f64);
    let dxmax = round_down_f64(ratio_max * dy as f64);
    let dymin = round_down_f64(ratio_min * dx as f64);
    let dymax = round_down_f64(ratio_max * dx as f64);
    let v = [
        (x0 - dxmin, y0 + dymax),
        (x1 - dxmin, y1 + dymax),
        (x1 + dxmax, y1 - dymin),
        (x0 + dxmax, y0 - dymin),
    ];
    let edges: Vec<Edge> = (0..4)
        .map(|i| Edge::new(v[i].0, v[i].1, v[(i + 1) % 4].0, v[(i + 1) % 4].1))
        .collect();
    polygon_generic(canvas, &edges);
}

/// `ImagingDrawPolygon(fill=1)`: the edges of the closed polygon (consecutive horizontal
/// edges going the same way merged), filled.
pub(super) fn polygon_fill(canvas: &mut PillowCanvas, xy: &[(i64, i64)]) {
    let count = xy.len();
    if count == 0 {
        return;
    }
    let mut edges: Vec<Edge> = Vec::with_capacity(count);
    let mut i = 0;
    while i + 1 < count {
        let (x0, y0) = xy[i];
        let (x1, y1) = xy[i + 1];
        if y0 == y1 && i != 0 && y0 == xy[i - 1].1 {
            let prev_x = xy[i - 1].0;
            if let Some(last) = edges.last_mut() {
                if x1 > x0 && x0 > prev_x {
                    last.xmax = x1;
                    i += 1;
                    continue;
                } else if x1 < x0 && x0 < prev_x {
                    last.xmin = x1;
                    i += 1;
                    continue;
                }
            }
        }
        edges.push(Edge::new(x0, y0, x1, y1));
        i += 1;
    }
    let last = xy[count - 1];
    if last != xy[0] {
        edges.push(Edge::new(last.0, last.1, xy[0].0, xy[0].1));
    }
    polygon_generic(canvas, &edges);
}

/// `polygon_generic` for an image without blending: horizontal edges are drawn as they
/// are, the others are intersected with every row and the spans between pairs filled.
fn polygon_generic(canvas: &mut PillowCanvas, e: &[Edge]) {
    if e.is_empty() {
        return;
    }
    let height = i64::from(canvas.height);
    let mut ymin = height - 1;
    let mut ymax = 0;
    let mut table: Vec<&Edge> = Vec::with_capacity(e.len());
    for edge in e {
        ymin = ymin.min(edge.ymin);
        ymax = ymax.max(edge.ymax);
        if edge.ymin == edge.ymax {
            canvas.hline(edge.xmin, edge.ymin, edge.xmax);
            continue;
        }
        table.push(edge);
    }
    let ymin = ymin.max(0);
    let ymax = ymax.min(height);
    let mut xx: Vec<f32> = Vec::with_capacity(table.len() * 2);
    for y in ymin..=ymax {
        xx.clear();
        for (i, cur) in table.iter().enumerate() {
            if y < cur.ymin || y > cur.ymax {
                continue;
            }
            xx.push(cur.x_at(y));
            let last = xx.len() - 1;
            if y == cur.ymax && y < ymax {
                // Needed to draw consistent polygons.
                xx.push(xx[last]);
            } else if (y == cur.ymin || y == cur.ymax) && cur.dx != 0.0 {
                // Connect discontiguous corners.
                for other in &table[..i] {
                    if (y != other.ymin && y != other.ymax) || other.dx == 0.0 {
                        continue;
                    }
                    if xx[last].round() != other.x_at(y).round() {
                        continue;
                    }
                    let offset = if y == cur.ymax { -1 } else { 1 };
                    let adj = cur.x_at(y + offset);
                    if y + offset >= other.ymin && y + offset <= other.ymax {
                        let adj_other = other.x_at(y + offset);
                        if xx[last] > adj + 1.0 && xx[last] > adj_other + 1.0 {
                            xx[last] = adj.max(adj_other).round() + 1.0;
                        } else if xx[last] < adj - 1.0 && xx[last] < adj_other - 1.0 {
                            xx[last] = adj.min(adj_other).round() - 1.0;
                        }
                        break;
                    }
                }
            }
        }
        xx.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        for pair in xx.chunks_exact(2) {
            canvas.hline(round_up_f32(pair[0]), y, round_down_f32(pair[1]));
        }
    }
}
