//! CSV as Python's `csv.reader(f, skipinitialspace=True)` reads it (dialect `excel`: `,`
//! delimiter, `"` quote, doubled quotes inside quotes, no escape character, not strict), which
//! is how AUTOMATIC1111 reads `styles.csv`. The `csv` crate has no `skipinitialspace`: with it
//! a hand-edited `name, "a, b"` is two fields in Python and three in the crate, so this is the
//! state machine of CPython's `Modules/_csv.c` for that one dialect.

/// Ends the current field and the record it closes.
fn end_record(rows: &mut Vec<Vec<String>>, row: &mut Vec<String>, field: &mut String) {
    row.push(std::mem::take(field));
    rows.push(std::mem::take(row));
}

/// The rows of `text`; a line with nothing on it is no row (`csv.reader` yields `[]`, which
/// `DictReader` skips). Newlines inside quotes stay in the field.
pub fn rows(text: &str) -> Vec<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        StartRecord,
        StartField,
        InField,
        InQuoted,
        QuoteInQuoted,
    }
    let mut rows = Vec::new();
    let mut row: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut state = State::StartRecord;
    let mut chars = text.chars().peekable();
    // `None` is the end of the text, which ends a record as a line end does.
    loop {
        let c = chars.next();
        let line_end = matches!(c, None | Some('\n') | Some('\r'));
        if c == Some('\r') && chars.peek() == Some(&'\n') && state != State::InQuoted {
            chars.next();
        }
        match state {
            State::StartRecord if line_end => {}
            State::StartRecord | State::StartField => match c {
                _ if line_end => {
                    end_record(&mut rows, &mut row, &mut field);
                    state = State::StartRecord;
                }
                Some('"') => state = State::InQuoted,
                Some(' ') => state = State::StartField,
                Some(',') => {
                    row.push(String::new());
                    state = State::StartField;
                }
                Some(ch) => {
                    field.push(ch);
                    state = State::InField;
                }
                None => unreachable!("None is a line end"),
            },
            State::InField => match c {
                _ if line_end => {
                    end_record(&mut rows, &mut row, &mut field);
                    state = State::StartRecord;
                }
                Some(',') => {
                    row.push(std::mem::take(&mut field));
                    state = State::StartField;
                }
                Some(ch) => field.push(ch),
                None => unreachable!("None is a line end"),
            },
            State::InQuoted => match c {
                // Python: "unexpected end of data" only when strict; otherwise the field ends.
                None => {
                    end_record(&mut rows, &mut row, &mut field);
                    state = State::StartRecord;
                }
                Some('"') => state = State::QuoteInQuoted,
                Some(ch) => field.push(ch),
            },
            State::QuoteInQuoted => match c {
                Some('"') => {
                    field.push('"');
                    state = State::InQuoted;
                }
                _ if line_end => {
                    end_record(&mut rows, &mut row, &mut field);
                    state = State::StartRecord;
                }
                Some(',') => {
                    row.push(std::mem::take(&mut field));
                    state = State::StartField;
                }
                // Not strict: a character after the closing quote joins the field.
                Some(ch) => {
                    field.push(ch);
                    state = State::InField;
                }
                None => unreachable!("None is a line end"),
            },
        }
        if c.is_none() {
            return rows;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::rows;

    fn want(rows: &[&[&str]]) -> Vec<Vec<String>> {
        rows.iter()
            .map(|r| r.iter().map(|f| f.to_string()).collect())
            .collect()
    }

    #[test]
    fn reads_as_python_does_with_skipinitialspace() {
        assert_eq!(
            rows("name, prompt\nA, \"x, {prompt}\"\n\nB,\"say \"\"hi\"\"\",z\r\n"),
            want(&[
                &["name", "prompt"],
                &["A", "x, {prompt}"],
                &["B", "say \"hi\"", "z"]
            ])
        );
        assert_eq!(
            rows("a,\"two\r\nlines\"\nb,"),
            want(&[&["a", "two\r\nlines"], &["b", ""]])
        );
        assert_eq!(rows("a,\"q\"tail, x"), want(&[&["a", "qtail", "x"]]));
        assert_eq!(rows("\"open"), want(&[&["open"]]));
        assert_eq!(rows("  \n"), want(&[&[""]]));
        assert_eq!(rows(""), want(&[]));
    }
}
