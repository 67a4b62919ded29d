//! An error and its causes in one line, for messages that must say why (tonic's transport error alone says only
//! "transport error"; aya's "program failed to load" hides the verifier's reason in its source).

/// `error: cause: cause…`; a cause whose text the line already holds (some libraries repeat their source in their
/// own message) is not said twice.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let said = e.to_string();
        if !line.contains(&said) {
            line.push_str(": ");
            line.push_str(&said);
        }
        cause = e.source();
    }
    line
}
