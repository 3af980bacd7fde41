//! Merkle trees over record hashes, as certificate transparency builds them (RFC 6962
//! section 2.1, verification as RFC 9162 section 2.1.3.2 and 2.1.4.2 give it): a leaf
//! is `SHA-256(0x00 || data)`, a node `SHA-256(0x01 || left || right)`, a tree of n
//! leaves splits at the largest power of two below n. An inclusion proof shows that one
//! record is in a tree whose head was signed; a consistency proof shows that a later
//! tree extends an earlier one without rewriting it. Both are checked with hashes alone.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

/// The hash of a leaf holding `data`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// The hash of an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two smaller than `n` (n >= 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// The tree head over `leaves` (leaf hashes, in order); the empty tree's is SHA-256 of
/// nothing.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The inclusion proof of leaf `index` in the tree over `leaves` (RFC 6962 `PATH`),
/// or `None` past the last leaf.
pub fn inclusion_proof(index: usize, leaves: &[Hash]) -> Option<Vec<Hash>> {
    fn path(m: usize, d: &[Hash], out: &mut Vec<Hash>) {
        if d.len() <= 1 {
            return;
        }
        let k = split(d.len());
        if m < k {
            path(m, &d[..k], out);
            out.push(root(&d[k..]));
        } else {
            path(m - k, &d[k..], out);
            out.push(root(&d[..k]));
        }
    }
    if index >= leaves.len() {
        return None;
    }
    let mut out = Vec::new();
    path(index, leaves, &mut out);
    Some(out)
}

/// Whether `proof` shows `leaf` at `index` in the tree of `size` leaves whose head is
/// `head`.
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], head: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node_hash(p, &r);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *head
}

/// The proof that the tree over the first `first` of `leaves` is a prefix of the tree
/// over all of them (RFC 6962 `PROOF`), or `None` unless `0 < first <= leaves.len()`.
pub fn consistency_proof(first: usize, leaves: &[Hash]) -> Option<Vec<Hash>> {
    fn sub(m: usize, d: &[Hash], whole: bool, out: &mut Vec<Hash>) {
        let n = d.len();
        if m == n {
            if !whole {
                out.push(root(d));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            sub(m, &d[..k], whole, out);
            out.push(root(&d[k..]));
        } else {
            sub(m - k, &d[k..], false, out);
            out.push(root(&d[..k]));
        }
    }
    if first == 0 || first > leaves.len() {
        return None;
    }
    let mut out = Vec::new();
    sub(first, leaves, true, &mut out);
    Some(out)
}

/// Whether `proof` shows that the tree of `first` leaves with head `first_head` is a
/// prefix of the tree of `second` leaves with head `second_head`.
pub fn verify_consistency(
    first: u64,
    second: u64,
    proof: &[Hash],
    first_head: &Hash,
    second_head: &Hash,
) -> bool {
    if first == 0 || first > second {
        return false;
    }
    if first == second {
        return proof.is_empty() && first_head == second_head;
    }
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if first.is_power_of_two() {
        path.push(*first_head);
    }
    path.extend_from_slice(proof);
    let Some((start, rest)) = path.split_first() else {
        return false;
    };
    let (mut f, mut s) = (first - 1, second - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (*start, *start);
    for c in rest {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    fr == *first_head && sr == *second_head && s == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inputs of the certificate transparency reference tests.
    const ENTRIES: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];
    /// Their tree heads for 0 to 8 leaves.
    const HEADS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    fn h(s: &str) -> Hash {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).unwrap();
        out
    }

    fn leaves() -> Vec<Hash> {
        ENTRIES
            .iter()
            .map(|e| leaf_hash(&hex::decode(e).unwrap()))
            .collect()
    }

    #[test]
    fn tree_heads_match_the_reference() {
        let l = leaves();
        for n in 0..=8 {
            assert_eq!(hex::encode(root(&l[..n])), HEADS[n], "{n} leaves");
        }
    }

    #[test]
    fn inclusion_proofs_match_the_reference_and_verify() {
        let l = leaves();
        // (leaf index, tree size, proof)
        let cases: [(usize, usize, &[&str]); 2] = [
            (
                0,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                8,
                &[
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
        ];
        for (i, n, want) in cases {
            let proof = inclusion_proof(i, &l[..n]).unwrap();
            let want: Vec<Hash> = want.iter().map(|w| h(w)).collect();
            assert_eq!(proof, want, "leaf {i} of {n}");
            assert!(verify_inclusion(
                i as u64,
                n as u64,
                &l[i],
                &proof,
                &h(HEADS[n])
            ));
            assert!(!verify_inclusion(
                i as u64,
                n as u64,
                &l[i],
                &proof,
                &h(HEADS[n - 1])
            ));
        }
        assert!(inclusion_proof(8, &l).is_none());
    }

    #[test]
    fn consistency_proofs_match_the_reference_and_verify() {
        let l = leaves();
        let cases: [(usize, usize, &[&str]); 4] = [
            (1, 1, &[]),
            (
                1,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                6,
                8,
                &[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                5,
                &[
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for (m, n, want) in cases {
            let proof = consistency_proof(m, &l[..n]).unwrap();
            let want: Vec<Hash> = want.iter().map(|w| h(w)).collect();
            assert_eq!(proof, want, "{m} -> {n}");
            let (a, b) = (h(HEADS[m]), h(HEADS[n]));
            assert!(verify_consistency(m as u64, n as u64, &proof, &a, &b));
            if m < n {
                assert!(!verify_consistency(m as u64, n as u64, &proof, &b, &a));
            }
        }
        assert!(consistency_proof(0, &l).is_none());
        assert!(consistency_proof(9, &l).is_none());
    }

    /// Every leaf of every tree up to 70 leaves proves, and nothing else does: a changed
    /// leaf, a wrong index, a cut proof, a rewritten prefix.
    #[test]
    fn every_shape_proves_and_forgeries_do_not() {
        let all: Vec<Hash> = (0u32..70).map(|i| leaf_hash(&i.to_le_bytes())).collect();
        for n in 1..=all.len() {
            let l = &all[..n];
            let head = root(l);
            for i in 0..n {
                let p = inclusion_proof(i, l).unwrap();
                assert!(verify_inclusion(i as u64, n as u64, &l[i], &p, &head));
                let other = leaf_hash(b"forged");
                assert!(!verify_inclusion(i as u64, n as u64, &other, &p, &head));
                if n > 1 {
                    let j = (i + 1) % n;
                    assert!(!verify_inclusion(j as u64, n as u64, &l[i], &p, &head));
                }
                if let Some((_, short)) = p.split_last() {
                    assert!(!verify_inclusion(i as u64, n as u64, &l[i], short, &head));
                }
            }
            for m in 1..=n {
                let p = consistency_proof(m, l).unwrap();
                let first = root(&l[..m]);
                assert!(
                    verify_consistency(m as u64, n as u64, &p, &first, &head),
                    "{m} -> {n}"
                );
                if m < n {
                    let mut rewritten = l[..m].to_vec();
                    rewritten[m - 1] = leaf_hash(b"rewritten");
                    assert!(
                        !verify_consistency(m as u64, n as u64, &p, &root(&rewritten), &head),
                        "{m} -> {n}"
                    );
                }
            }
        }
    }
}
