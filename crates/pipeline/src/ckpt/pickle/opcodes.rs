//! The opcode loop of the pickle interpreter (`Unpickler::load`).

use std::cell::RefCell;
use std::rc::Rc;

use super::{pairs, Obj, PResult, Unpickler};

impl<'a> Unpickler<'a> {
    pub(in crate::ckpt) fn load(&mut self) -> PResult<Obj> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(format!("unsupported pickle protocol {proto}"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Obj::Mark),
                b'}' => self.stack.push(Obj::Dict(Default::default())),
                b']' => self.stack.push(Obj::List(Default::default())),
                b')' => self.stack.push(Obj::Tuple(Rc::new(Vec::new()))),
                b'N' => self.stack.push(Obj::None),
                0x88 => self.stack.push(Obj::Bool(true)),
                0x89 => self.stack.push(Obj::Bool(false)),
                b'J' => {
                    let v = self.u32()? as u32 as i32;
                    self.stack.push(Obj::Int(v as i128));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Obj::Int(v as i128));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Obj::Int(v as i128));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 16 {
                        return Err("integer too large".into());
                    }
                    let b = self.take(n)?;
                    let mut v: i128 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= (x as i128) << (8 * i);
                    }
                    if n > 0 && n < 16 && b[n - 1] & 0x80 != 0 {
                        v -= 1i128 << (8 * n); // two's complement sign
                    }
                    self.stack.push(Obj::Int(v));
                }
                b'G' => {
                    let b = self.take(8)?;
                    self.stack.push(Obj::Float(f64::from_be_bytes(
                        b.try_into().expect("8 bytes"),
                    )));
                }
                b'I' => {
                    // Protocol 0 INT: "01"/"00" are booleans.
                    let l = self.line()?;
                    let o = match l.as_str() {
                        "00" => Obj::Bool(false),
                        "01" => Obj::Bool(true),
                        s => Obj::Int(s.parse().map_err(|_| "bad INT")?),
                    };
                    self.stack.push(o);
                }
                // (SHORT_)BINUNICODE(8): UTF-8 text.
                b'X' | 0x8c | 0x8d => {
                    let n = self.length_prefix(op)?;
                    let s = self.string(n)?;
                    self.stack.push(s);
                }
                // (SHORT_)BINSTRING: Python 2 byte strings, read as text.
                b'T' | b'U' => {
                    let n = self.length_prefix(op)?;
                    let b = self.take(n)?;
                    self.stack.push(Obj::Str(String::from_utf8_lossy(b).into()));
                }
                // (SHORT_)BINBYTES(8).
                b'B' | b'C' | 0x8e => {
                    let n = self.length_prefix(op)?;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Obj::Bytes(b));
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Obj::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("malformed pickle: stack underflow".into());
                    }
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.stack.push(Obj::Tuple(Rc::new(items)));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Obj::List(Rc::new(RefCell::new(items))));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items)?;
                    self.stack.push(Obj::Dict(Rc::new(RefCell::new(pairs))));
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Obj::List(l) => l.borrow_mut().push(v),
                        _ => return Err("APPEND to a non-list".into()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Obj::List(l) => l.borrow_mut().extend(items),
                        _ => return Err("APPENDS to a non-list".into()),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Obj::Dict(d) => d.borrow_mut().push((k, v)),
                        _ => return Err("SETITEM on a non-dict".into()),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let p = pairs(items)?;
                    match self.top()? {
                        Obj::Dict(d) => d.borrow_mut().extend(p),
                        _ => return Err("SETITEMS on a non-dict".into()),
                    }
                }
                0x8f => self.stack.push(Obj::List(Default::default())), // EMPTY_SET: as a list
                0x90 => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Obj::List(l) => l.borrow_mut().extend(items),
                        _ => return Err("ADDITEMS to a non-set".into()),
                    }
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.stack.push(Obj::Tuple(Rc::new(items)));
                }
                // BINPUT, LONG_BINPUT, MEMOIZE, PUT.
                b'q' | b'r' | 0x94 | b'p' => {
                    let i = match op {
                        b'q' => self.u8()? as u32,
                        b'r' => self.u32()? as u32,
                        0x94 => self.memo.len() as u32,
                        _ => self.line()?.parse().map_err(|_| "bad memo key")?,
                    };
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                // BINGET, LONG_BINGET, GET.
                b'h' | b'j' | b'g' => {
                    let i = match op {
                        b'h' => self.u8()? as u32,
                        b'j' => self.u32()? as u32,
                        _ => self.line()?.parse().map_err(|_| "bad memo key")?,
                    };
                    let v = self
                        .memo
                        .get(&i)
                        .cloned()
                        .ok_or("malformed pickle: unknown memo key")?;
                    self.stack.push(v);
                }
                b'0' => {
                    self.stack.pop();
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(&module, &name)?;
                    self.stack.push(Obj::Global(g));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Obj::Str(module), Obj::Str(name)) = (module, name) else {
                        return Err("STACK_GLOBAL with non-string names".into());
                    };
                    let g = self.global(&module, &name)?;
                    self.stack.push(Obj::Global(g));
                }
                b'i' => {
                    // INST: module and name inline, then instantiate with the marked args.
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(&module, &name)?;
                    let args = self.pop_mark()?;
                    let r = self.call(g, args)?;
                    self.stack.push(r);
                }
                b'o' => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return Err("OBJ without a class".into());
                    }
                    let cls = items.remove(0);
                    let Obj::Global(g) = cls else {
                        return Err("OBJ on a non-class".into());
                    };
                    let r = self.call(g, items)?;
                    self.stack.push(r);
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let Obj::Tuple(args) = args else {
                        return Err("REDUCE arguments are not a tuple".into());
                    };
                    let Obj::Global(g) = f else {
                        return Err("REDUCE on something that is not an allowed global".into());
                    };
                    let r = self.call(g, args.to_vec())?;
                    self.stack.push(r);
                }
                0x92 => {
                    // NEWOBJ_EX(cls, args, kwargs)
                    let _kwargs = self.pop()?;
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let (Obj::Tuple(args), Obj::Global(g)) = (args, f) else {
                        return Err("bad NEWOBJ_EX".into());
                    };
                    let r = self.call(g, args.to_vec())?;
                    self.stack.push(r);
                }
                b'b' => {
                    // BUILD sets state on the object below; only harmless cases are accepted.
                    let state = self.pop()?;
                    match (self.top()?, state) {
                        (_, Obj::None) => {}
                        // An `OrderedDict`'s instance attributes, e.g. the `_metadata` (module
                        // versions) of every `state_dict()`: plain data, dropped.
                        (Obj::Dict(_), Obj::Dict(_)) => {}
                        (Obj::Tensor(_), _) => {}
                        _ => return Err("BUILD with state on an unsupported object".into()),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let s = self.persistent(pid)?;
                    self.stack.push(s);
                }
                b'P' => return Err("text persistent ids are not supported".into()),
                _ => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{op:02x} at byte {}",
                        self.pos - 1
                    ))
                }
            }
        }
    }
}
