//! The Grid Engine form of "run this job in OS image NAME": the `vm_image` complex.
//!
//! Each execution host publishes the images of its store as one string value,
//! `/<name>/<name>/…/` (a load sensor: [`super::load_sensor`]); a job's hard request
//! `vm_image=*/<name>/*` is a wildcard pattern that matches exactly the hosts whose value lists
//! `<name>` (complex(5): string requests are patterns matched against the host's value). Users
//! write `-l vm_image=<name>`; the JSV ([`super::jsv`]) turns that into the pattern and adds
//! `SGE_VM_IMAGE=<name>` to the job's environment, which is what the shepherd reads
//! ([`crate::image::selection`]). `/` cannot appear in an image name, and unlike `,` it is not a
//! list separator for `qsub -l` or the JSV protocol.
//!
//! The complex, as `qconf -sc` shows it:
//! `vm_image  vmi  RESTRING  ==  YES  NO  NONE  0`

use crate::image::validate_name;

/// The complex's name and shortcut.
pub const COMPLEX: &str = "vm_image";
pub const SHORTCUT: &str = "vmi";
/// The line to add with `qconf -mc`.
pub const COMPLEX_LINE: &str = "vm_image  vmi  RESTRING  ==  YES  NO  NONE  0";

const SEPARATOR: char = '/';

/// A host's value: its image names between separators (`/` alone when it has none).
pub fn host_value<S: AsRef<str>>(names: &[S]) -> String {
    let mut value = String::from(SEPARATOR);
    for name in names {
        value.push_str(name.as_ref());
        value.push(SEPARATOR);
    }
    value
}

/// The request pattern that matches the hosts that have image `name`.
pub fn scheduler_pattern(name: &str) -> String {
    format!("*{SEPARATOR}{name}{SEPARATOR}*")
}

/// What a `vm_image` request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// `NAME`, as users write it.
    Name(&'a str),
    /// `*/NAME/*`, as the JSV leaves it for the scheduler.
    Pattern(&'a str),
}

impl<'a> Request<'a> {
    /// Parses a request's value; `Err` says why it is not an image request this host serves.
    pub fn parse(value: &'a str) -> Result<Self, String> {
        let value = value.trim();
        let inner = value
            .strip_prefix('*')
            .and_then(|v| v.strip_prefix(SEPARATOR))
            .and_then(|v| v.strip_suffix('*'))
            .and_then(|v| v.strip_suffix(SEPARATOR));
        let (name, request) = match inner {
            Some(name) => (name, Request::Pattern(name)),
            None => (value, Request::Name(value)),
        };
        validate_name(name).map_err(|e| format!("{COMPLEX}={value}: {e}"))?;
        Ok(request)
    }

    pub fn name(&self) -> &'a str {
        match self {
            Request::Name(n) | Request::Pattern(n) => n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_value_lists_every_name_between_separators() {
        assert_eq!(host_value(&["bookworm", "bullseye"]), "/bookworm/bullseye/");
        assert_eq!(host_value::<&str>(&[]), "/");
    }

    #[test]
    fn the_pattern_matches_a_whole_name_only() {
        let value = host_value(&["rocky9", "bullseye"]);
        let pattern = scheduler_pattern("rocky9");
        // Grid Engine's wildcard match, as fnmatch does it.
        let matches = |p: &str, v: &str| {
            let p = std::ffi::CString::new(p).unwrap();
            let v = std::ffi::CString::new(v).unwrap();
            // SAFETY: both are valid NUL-terminated strings that outlive the call.
            unsafe { libc::fnmatch(p.as_ptr(), v.as_ptr(), 0) == 0 }
        };
        assert!(matches(&pattern, &value));
        assert!(!matches(&scheduler_pattern("rocky"), &value));
        assert!(!matches(&scheduler_pattern("ocky9"), &value));
        assert!(!matches(&pattern, &host_value::<&str>(&[])));
    }

    #[test]
    fn requests_parse_in_both_forms_and_refuse_other_names() {
        assert_eq!(Request::parse("bullseye"), Ok(Request::Name("bullseye")));
        assert_eq!(
            Request::parse("*/bullseye/*"),
            Ok(Request::Pattern("bullseye"))
        );
        assert_eq!(Request::parse(" rocky-9.3 ").unwrap().name(), "rocky-9.3");
        for bad in ["", "*", "a*", "*/a", "../etc", "*/../*", "a b", ".hidden"] {
            assert!(Request::parse(bad).is_err(), "{bad:?}");
        }
    }
}
