//! A job submission verifier (jsv(1)) for OS image requests: `qsub -l vm_image=NAME` becomes
//! the scheduler's pattern `vm_image=*/NAME/*` ([`super::image_request`]) plus
//! `SGE_VM_IMAGE=NAME` in the job's environment, which the shepherd reads; a job that sets only
//! `SGE_VM_IMAGE` gets the request added, so it too runs only where its image is. An invalid
//! name, two different images, or an image as a soft request are refused at submission.
//!
//! The protocol (client side, `qsub -jsv`, or qmaster's `jsv_url`): lines `START`, then per
//! job `PARAM name value`… `ENV ADD name value`… `BEGIN`; the verifier answers `STARTED` (after
//! `SEND ENV`, to see the environment), then its changes (`PARAM`, `ENV ADD`) and one
//! `RESULT STATE ACCEPT|CORRECT|REJECT message`. `QUIT` ends it.

use std::io::{self, BufRead, Write};

use super::image_request::{scheduler_pattern, Request, COMPLEX, SHORTCUT};
use crate::image::selection::JOB_IMAGE_VAR;
use crate::image::validate_name;

/// Where the verifier is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for `START`.
    Initialized,
    /// Collecting one job's parameters and environment until `BEGIN`.
    Started,
}

/// The verifier: one per JSV process, for any number of jobs.
#[derive(Debug)]
pub struct Jsv {
    state: State,
    params: Vec<(String, String)>,
    env: Vec<(String, String)>,
}

impl Default for Jsv {
    fn default() -> Self {
        Jsv {
            state: State::Initialized,
            params: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// What to send back for one input line, and whether the conversation is over.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reply {
    pub lines: Vec<String>,
    pub quit: bool,
}

impl Jsv {
    pub fn handle(&mut self, line: &str) -> Reply {
        let line = line.trim_end_matches(['\r', '\n']);
        let (command, rest) = line.split_once(' ').unwrap_or((line, ""));
        let lines = match (command, self.state) {
            ("QUIT", _) => {
                return Reply {
                    lines: Vec::new(),
                    quit: true,
                }
            }
            ("", _) => Vec::new(),
            ("START", State::Initialized) => {
                self.state = State::Started;
                vec!["SEND ENV".into(), "STARTED".into()]
            }
            ("PARAM", State::Started) => {
                let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
                self.params.retain(|(n, _)| n != name);
                self.params.push((name.to_string(), value.to_string()));
                Vec::new()
            }
            ("ENV", State::Started) => {
                // Only `ENV ADD name value` comes this way.
                if let Some(("ADD", var)) = rest.split_once(' ') {
                    let (name, value) = var.split_once(' ').unwrap_or((var, ""));
                    self.env.retain(|(n, _)| n != name);
                    self.env.push((name.to_string(), value.to_string()));
                }
                Vec::new()
            }
            ("BEGIN", State::Started) => {
                let verdict = verify(&self.params, &self.env);
                self.params.clear();
                self.env.clear();
                verdict
            }
            (other, state) => vec![format!(
                "ERROR sge_virtualizer jsv got {other:?} in state {state:?}"
            )],
        };
        Reply { lines, quit: false }
    }
}

/// Runs the verifier over `input` until `QUIT` or its end.
pub fn serve(input: impl BufRead, mut output: impl Write) -> io::Result<()> {
    let mut jsv = Jsv::default();
    for line in input.lines() {
        let reply = jsv.handle(&line?);
        for l in &reply.lines {
            writeln!(output, "{l}")?;
        }
        output.flush()?;
        if reply.quit {
            break;
        }
    }
    Ok(())
}

fn is_image_complex(name: &str) -> bool {
    name == COMPLEX || name == SHORTCUT
}

/// The entries of a resource list parameter (`name=value,name,…`).
fn entries(list: &str) -> Vec<(&str, Option<&str>)> {
    list.split(',')
        .filter(|e| !e.is_empty())
        .map(|e| match e.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (e, None),
        })
        .collect()
}

fn get<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn result(state: &str, message: &str) -> String {
    format!("RESULT STATE {state} {message}")
}

/// The verdict on one job: its changes, then its result line.
fn verify(params: &[(String, String)], env: &[(String, String)]) -> Vec<String> {
    let reject = |m: String| vec![result("REJECT", &m)];
    let soft = get(params, "l_soft").unwrap_or_default();
    if entries(soft).iter().any(|(n, _)| is_image_complex(n)) {
        return reject(format!(
            "{COMPLEX} must be a hard request (the job runs in exactly one OS image)"
        ));
    }
    let hard = get(params, "l_hard").unwrap_or_default();
    let hard_entries = entries(hard);
    let requested: Vec<&str> = hard_entries
        .iter()
        .filter(|(n, _)| is_image_complex(n))
        .map(|(_, v)| v.unwrap_or_default())
        .collect();
    let from_env = get(env, JOB_IMAGE_VAR)
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let name = match (requested.as_slice(), from_env) {
        ([], None) => return vec![result("ACCEPT", "")],
        ([], Some(e)) => {
            if let Err(err) = validate_name(e) {
                return reject(format!("{JOB_IMAGE_VAR}={e}: {err}"));
            }
            e
        }
        ([value], env_name) => {
            let name = match Request::parse(value) {
                Ok(r) => r.name(),
                Err(e) => return reject(e),
            };
            if let Some(e) = env_name.filter(|e| *e != name) {
                return reject(format!(
                    "the job asks for two OS images: {COMPLEX}={value} and {JOB_IMAGE_VAR}={e}"
                ));
            }
            name
        }
        (many, _) => {
            return reject(format!(
                "the job asks for {} OS images ({COMPLEX}={}); ask for one",
                many.len(),
                many.join(", ")
            ))
        }
    };
    let pattern = format!("{COMPLEX}={}", scheduler_pattern(name));
    let mut new_hard: Vec<String> = hard_entries
        .iter()
        .filter(|(n, _)| !is_image_complex(n))
        .map(|(n, v)| match v {
            Some(v) => format!("{n}={v}"),
            None => n.to_string(),
        })
        .collect();
    new_hard.push(pattern.clone());
    let new_hard = new_hard.join(",");
    let mut lines = Vec::new();
    if !hard_entries
        .iter()
        .any(|(n, v)| format!("{n}={}", v.unwrap_or_default()) == pattern)
    {
        lines.push(format!("PARAM l_hard {new_hard}"));
    }
    if from_env.is_none() {
        lines.push(format!("ENV ADD {JOB_IMAGE_VAR} {name}"));
    }
    if lines.is_empty() {
        lines.push(result("ACCEPT", ""));
    } else {
        lines.push(result(
            "CORRECT",
            &format!("OS image {name}: runs only on hosts that have it"),
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The replies to a whole conversation, one job.
    fn converse(job: &[&str]) -> Vec<String> {
        let mut jsv = Jsv::default();
        let mut out = Vec::new();
        for line in ["START"].iter().chain(job).chain(&["BEGIN"]) {
            out.extend(jsv.handle(line).lines);
        }
        out
    }

    #[test]
    fn a_plain_image_request_becomes_the_pattern_and_the_variable() {
        let out = converse(&["PARAM l_hard h_vmem=1G,vm_image=bullseye", "PARAM b n"]);
        assert_eq!(
            out,
            [
                "SEND ENV",
                "STARTED",
                "PARAM l_hard h_vmem=1G,vm_image=*/bullseye/*",
                "ENV ADD SGE_VM_IMAGE bullseye",
                "RESULT STATE CORRECT OS image bullseye: runs only on hosts that have it",
            ]
        );
        // The shortcut too.
        let out = converse(&["PARAM l_hard vmi=bullseye"]);
        assert_eq!(out[2], "PARAM l_hard vm_image=*/bullseye/*");
    }

    #[test]
    fn the_variable_alone_gets_the_request() {
        let out = converse(&["PARAM l_hard h_rt=60", "ENV ADD SGE_VM_IMAGE rocky9"]);
        assert_eq!(
            &out[2..],
            [
                "PARAM l_hard h_rt=60,vm_image=*/rocky9/*",
                "RESULT STATE CORRECT OS image rocky9: runs only on hosts that have it",
            ]
        );
        let out = converse(&["ENV ADD SGE_VM_IMAGE rocky9"]);
        assert_eq!(out[2], "PARAM l_hard vm_image=*/rocky9/*");
    }

    #[test]
    fn a_job_already_in_its_final_form_or_without_an_image_is_accepted() {
        let out = converse(&[
            "PARAM l_hard vm_image=*/bullseye/*",
            "ENV ADD SGE_VM_IMAGE bullseye",
        ]);
        assert_eq!(&out[2..], ["RESULT STATE ACCEPT "]);
        let out = converse(&["PARAM l_hard h_vmem=1G", "ENV ADD HOME /home/u"]);
        assert_eq!(&out[2..], ["RESULT STATE ACCEPT "]);
    }

    #[test]
    fn bad_requests_are_refused_at_submission() {
        for (job, why) in [
            (vec!["PARAM l_hard vm_image=../etc"], "invalid image name"),
            (vec!["PARAM l_hard vm_image=b*"], "invalid image name"),
            (
                vec!["PARAM l_hard vm_image=a", "ENV ADD SGE_VM_IMAGE b"],
                "two OS images",
            ),
            (vec!["PARAM l_hard vm_image=a,vmi=b"], "2 OS images"),
            (vec!["PARAM l_soft vm_image=a"], "must be a hard request"),
            (vec!["ENV ADD SGE_VM_IMAGE a/b"], "invalid image name"),
        ] {
            let out = converse(&job.iter().map(|s| &**s).collect::<Vec<_>>());
            let last = out.last().unwrap();
            assert!(last.starts_with("RESULT STATE REJECT "), "{job:?}: {out:?}");
            assert!(last.contains(why), "{job:?}: {last}");
        }
    }

    #[test]
    fn each_job_starts_afresh_and_quit_ends() {
        let mut jsv = Jsv::default();
        jsv.handle("START");
        jsv.handle("PARAM l_hard vm_image=a");
        jsv.handle("BEGIN");
        jsv.handle("PARAM l_hard h_rt=1");
        assert_eq!(jsv.handle("BEGIN").lines, ["RESULT STATE ACCEPT "]);
        assert!(jsv.handle("QUIT").quit);
        // Out of order.
        let mut jsv = Jsv::default();
        assert!(jsv.handle("BEGIN").lines[0].starts_with("ERROR "));
    }

    #[test]
    fn serve_answers_line_by_line() {
        let mut out = Vec::new();
        serve(
            &b"START\nPARAM l_hard vm_image=a\nBEGIN\nQUIT\nSTART\n"[..],
            &mut out,
        )
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.starts_with("SEND ENV\nSTARTED\nPARAM l_hard vm_image=*/a/*\n"),
            "{out}"
        );
        assert_eq!(out.matches("STARTED").count(), 1, "{out}");
    }
}
