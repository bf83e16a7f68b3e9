//! Plain human tables (comfy-table): no borders, columns aligned, no trailing blanks.

pub use comfy_table::Table;

/// A table without borders.
pub fn plain() -> Table {
    let mut t = Table::new();
    t.load_style(comfy_table::presets::NOTHING);
    t
}

/// The table's text with each line's trailing padding removed.
pub fn render(t: &Table) -> String {
    t.lines()
        .map(|l| l.trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}
