//! [`stack_compatible`]: stack the members that agree, reject each other one
//! with its own error.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::borrow::Borrow;

use super::stack::Walk;
use super::StackError;
use crate::{Layout, Tree};

/// The result of [`stack_compatible`].
///
/// `members` and the indices in `rejected` are ascending and together cover
/// every input index exactly once.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StackOutcome {
    /// The stacked tree of the members, or `None` if no member could be stacked.
    /// Its leading dimension is `members.len()`.
    pub stacked: Option<Tree>,
    /// The indices (into the input) of the trees stacked, in order: row `i` of
    /// `stacked` is input `members[i]`.
    pub members: Vec<usize>,
    /// Every other input index, each with the reason it was left out.
    pub rejected: Vec<(usize, StackError)>,
}

/// Stacks the members of a batch that agree in structure, and gives every other
/// member its own error, so that one malformed request never fails the others.
///
/// The reference structure is the most common [`Layout`] among the members that
/// can be stacked on their own (every member, now that strings and bytes stack
/// as lists; the check stays for leaves that may not); ties go to the
/// layout that arrived first (lowest index). Taking the most common layout rather
/// than member 0's means that a single bad request at the front of a batch costs
/// only that request. Each rejected member's error names the first node where it
/// differs from the reference member (the first member with the reference layout).
///
/// With no trees, the outcome is empty.
pub fn stack_compatible<T: Borrow<Tree>>(trees: &[T]) -> StackOutcome {
    let trees: Vec<&Tree> = trees.iter().map(Borrow::borrow).collect();
    let mut rejected = Vec::new();

    // Members whose own leaves cannot stack are out whatever the others hold.
    // (Since strings and bytes stack as lists, every leaf kind can.)
    let mut candidates: Vec<(usize, Layout)> = Vec::with_capacity(trees.len());
    for (i, tree) in trees.iter().enumerate() {
        match Walk::new(&[i], false).node(&[tree]) {
            Ok(_) => candidates.push((i, tree.layout())),
            Err(e) => rejected.push((i, e)),
        }
    }

    // The most common layout, ties to the earliest: (count, first index) per layout.
    let mut counts: BTreeMap<&Layout, (usize, usize)> = BTreeMap::new();
    for (i, layout) in &candidates {
        counts.entry(layout).or_insert((0, *i)).0 += 1;
    }
    let reference = counts
        .values()
        .max_by(|(c1, i1), (c2, i2)| c1.cmp(c2).then(i2.cmp(i1)))
        .map(|&(_, first)| first);

    let mut members = Vec::new();
    let mut stacked = None;
    if let Some(r) = reference {
        // Membership is decided by the same comparison that `stack` makes, so the
        // stack below agrees with it and each rejection gets a precise error.
        for (i, _) in &candidates {
            match Walk::new(&[r, *i], false).node(&[trees[r], trees[*i]]) {
                Ok(_) => members.push(*i),
                Err(e) => rejected.push((*i, e)),
            }
        }
        let nodes: Vec<&Tree> = members.iter().map(|&i| trees[i]).collect();
        match Walk::new(&members, true).node(&nodes) {
            Ok(tree) => stacked = Some(tree),
            Err(e) => rejected.extend(members.drain(..).map(|i| (i, e.clone()))),
        }
    }
    rejected.sort_by_key(|(i, _)| *i);
    StackOutcome {
        stacked,
        members,
        rejected,
    }
}
