//! How listings print: JSON of a serde view (see `view`) for `--json`, or
//! a table for people. Both write with `println!`: on a closed stdout the
//! client commands exit 0 on SIGPIPE (see `exit_quietly_on_closed_stdout`)
//! instead of panicking.

use std::fmt::Display;

use serde::Serialize;

/// Prints a view as pretty JSON (what `--json` prints).
pub(super) fn json<V: Serialize + ?Sized>(view: &V) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(view)?);
    Ok(())
}

/// Prints a list of API messages as a JSON array of their views.
pub(super) fn json_list<'a, M: 'a, V: Serialize + From<&'a M>>(
    items: impl IntoIterator<Item = &'a M>,
) -> anyhow::Result<()> {
    let views: Vec<V> = items.into_iter().map(V::from).collect();
    json(&views)
}

/// A table column: a heading and the width its cells are padded to (the
/// last column is not padded).
pub(super) struct Column {
    heading: &'static str,
    width: usize,
    right: bool,
}

impl Column {
    /// A left-aligned column.
    pub(super) const fn left(heading: &'static str, width: usize) -> Column {
        Column {
            heading,
            width,
            right: false,
        }
    }

    /// A right-aligned column (numbers, sizes).
    pub(super) const fn right(heading: &'static str, width: usize) -> Column {
        Column {
            heading,
            width,
            right: true,
        }
    }

    /// The last column: it takes the rest of the line.
    pub(super) const fn last(heading: &'static str) -> Column {
        Column::left(heading, 0)
    }
}

/// A table for people: the heading line is printed when it is made, each
/// row when it is given (so a command may print notes between rows).
pub(super) struct Table(&'static [Column]);

impl Table {
    /// Prints the headings.
    pub(super) fn new(columns: &'static [Column]) -> Table {
        let table = Table(columns);
        let headings: Vec<&dyn Display> = columns.iter().map(|c| &c.heading as _).collect();
        table.row(&headings);
        table
    }

    /// Prints one row, a cell per column.
    pub(super) fn row(&self, cells: &[&dyn Display]) {
        println!("{}", self.line(cells));
    }

    fn line(&self, cells: &[&dyn Display]) -> String {
        let mut line = String::new();
        for (i, (column, cell)) in self.0.iter().zip(cells).enumerate() {
            let width = column.width;
            if i + 1 == self.0.len() {
                line.push_str(&cell.to_string());
            } else if column.right {
                line.push_str(&format!("{cell:>width$} "));
            } else {
                line.push_str(&format!("{cell:<width$} "));
            }
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COLUMNS: &[Column] = &[
        Column::left("NAME", 6),
        Column::right("SIZE", 5),
        Column::last("NOTE"),
    ];

    #[test]
    fn cells_are_padded_to_their_column_and_the_last_is_not() {
        let table = Table(COLUMNS);
        assert_eq!(
            table.line(&[&"NAME", &"SIZE", &"NOTE"]),
            "NAME    SIZE NOTE"
        );
        assert_eq!(
            table.line(&[&"a", &42, &"hi there"]),
            "a         42 hi there"
        );
        // A cell wider than its column pushes the rest right, as format! does.
        assert_eq!(table.line(&[&"longname", &1, &""]), "longname     1 ");
    }
}
