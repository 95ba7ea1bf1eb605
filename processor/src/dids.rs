//! DIDs: the public numbers of the cluster's accounts, `<prefix>did:<E.164>` → AOR in Redis,
//! and back, `<prefix>did-of:{<AOR>}` → the number its calls to trunks assert (P-Asserted-
//! Identity and From user: the caller's number the PSTN shows).
//! A call from a trusted trunk to a DID rings the account's phones (from the alias socket
//! each registered through); a subscriber dialling a DID reaches the account inside the
//! cluster instead of going out and back through a trunk. Managed with `sipalias-processor
//! did add|delete|list`.

use redis::aio::ConnectionManager;

use crate::error::Error;

/// The DIDs in Redis.
#[derive(Clone)]
pub struct Dids {
    conn: ConnectionManager,
    prefix: String,
}

/// Checks a DID as stored: `+` and 6–15 digits, not starting with 0.
pub fn check_number(number: &str) -> Result<(), String> {
    let ok = number.strip_prefix('+').is_some_and(|d| {
        (6..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()) && !d.starts_with('0')
    });
    if ok {
        Ok(())
    } else {
        Err(format!("{number:?} is not an E.164 number (+ and 6–15 digits)"))
    }
}

/// Checks the AOR a DID points at: `user@domain`, printable, without spaces, at most 256
/// bytes.
pub fn check_aor(aor: &str) -> Result<(), String> {
    let ok = aor.len() <= 256
        && aor
            .split_once('@')
            .is_some_and(|(u, d)| !u.is_empty() && !d.is_empty() && !d.contains('@'))
        && aor.chars().all(|c| c.is_ascii_graphic());
    if ok { Ok(()) } else { Err(format!("{aor:?} is not an AOR (user@domain)")) }
}

impl Dids {
    /// DIDs under `prefix` in Redis.
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Dids { conn, prefix: prefix.to_owned() }
    }

    fn key(&self, number: &str) -> String {
        format!("{}did:{number}", self.prefix)
    }

    fn of_key(&self, aor: &str) -> String {
        format!("{}did-of:{{{aor}}}", self.prefix)
    }

    /// The number calls of `aor` to trunks assert: the DID pointed at it last.
    pub async fn number_of(&self, aor: &str) -> Result<Option<String>, Error> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("GET").arg(self.of_key(aor)).query_async(&mut conn).await?)
    }

    /// The AOR of DID `number` (E.164), if it is one.
    pub async fn get(&self, number: &str) -> Result<Option<String>, Error> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("GET").arg(self.key(number)).query_async(&mut conn).await?)
    }

    /// Points DID `number` at `aor` (replacing what it pointed at), and makes it the number
    /// `aor`'s calls assert; atomically.
    pub async fn set(&self, number: &str, aor: &str) -> Result<(), Error> {
        check_number(number).map_err(Error::Config)?;
        check_aor(aor).map_err(Error::Config)?;
        let mut conn = self.conn.clone();
        let old: Option<String> = redis::Script::new(SET_LUA)
            .key(self.key(number))
            .key(self.of_key(aor))
            .arg(number)
            .arg(aor)
            .invoke_async(&mut conn)
            .await?;
        // The previous owner no longer asserts this number.
        if let Some(old) = old.filter(|o| o != aor) {
            let _: i64 = redis::Script::new(UNLINK_LUA)
                .key(self.of_key(&old))
                .arg(number)
                .invoke_async(&mut conn)
                .await?;
        }
        Ok(())
    }

    /// Removes DID `number`; whether it existed.
    pub async fn delete(&self, number: &str) -> Result<bool, Error> {
        let mut conn = self.conn.clone();
        let aor: Option<String> =
            redis::cmd("GETDEL").arg(self.key(number)).query_async(&mut conn).await?;
        let Some(aor) = aor else { return Ok(false) };
        let _: i64 = redis::Script::new(UNLINK_LUA)
            .key(self.of_key(&aor))
            .arg(number)
            .invoke_async(&mut conn)
            .await?;
        Ok(true)
    }

    /// Every DID with its AOR, sorted by number (a `SCAN`: for operators, not calls).
    pub async fn list(&self) -> Result<Vec<(String, String)>, Error> {
        let mut conn = self.conn.clone();
        let keys = crate::location::scan_keys(&mut conn, &format!("{}did:+*", self.prefix)).await?;
        let mut out = Vec::new();
        for chunk in keys.chunks(1000) {
            let values: Vec<Option<String>> =
                redis::cmd("MGET").arg(chunk).query_async(&mut conn).await?;
            for (key, aor) in chunk.iter().zip(values) {
                let (Some(number), Some(aor)) =
                    (key.strip_prefix(&format!("{}did:", self.prefix)), aor)
                else {
                    continue;
                };
                out.push((number.to_owned(), aor));
            }
        }
        out.sort();
        Ok(out)
    }
}

/// KEYS[1] the DID, KEYS[2] its AOR's number; ARGV number, AOR. Returns the AOR the DID
/// pointed at before.
const SET_LUA: &str = r"
local old = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[1])
return old
";

/// KEYS[1] an AOR's number; ARGV[1] a number: forgets it if it is that one.
const UNLINK_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_aors_are_checked() {
        assert!(check_number("+442079460001").is_ok());
        for bad in [
            "442079460001",
            "+4420",
            "+0442079460001",
            "+44 20 7946",
            "+1234567890123456",
            "",
            "+",
            "+44207946000a",
            "did:+44*",
        ] {
            assert!(check_number(bad).is_err(), "{bad:?}");
        }
        assert!(check_aor("alice@sip.example.net").is_ok());
        for bad in ["alice", "@x", "a@", "a@b@c", "a b@c", "a@c\r\nX: y", "é@c", &"a".repeat(300)]
        {
            assert!(check_aor(bad).is_err(), "{bad:?}");
        }
    }
}
