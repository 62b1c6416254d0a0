"""An in-memory nftables: the subset of nft our planner emits, applied as the kernel would.

Modules, one job each:

    values.py     literal values: element text -> canonical values (cached), and back for listings
    fields.py     the packet fields it knows, as expr.Selector values
    tokens.py     script text -> located tokens, one list per command
    parser.py     tokens -> typed commands (ruleset.Operation, equal to what the planner builds)
    commands.py   the few commands only a script has (listings, element timeouts)
    state.py      the tables it holds (chains of expr.Rule values, sets of canonical values)
    checks.py     what the kernel refuses in a rule, and its chain validation
    executor.py   typed commands -> a copy of the tables, copy-on-write, committed whole or not at all
    dump.py       the state as sorted text
    memory.py     FakeNftables, the front: apply(tx), run(text), check, list_objects, delete_table

The subset (as text; a Transaction holds the same as values):

    add|delete|flush table FAMILY NAME            (FAMILY: ip, ip6, inet)
    add chain T NAME [{ type filter|nat hook H priority N ; [policy accept|drop ;] }]
    add map|set T NAME { type A . B [: C] | typeof EXPR [: EXPR] ; [flags F,... ;] [timeout 10s ;] }
    delete|flush chain|map|set T NAME
    add|delete counter T NAME [{ packets N bytes N ; }]     (named counters: userspace mode's fail-open)
    add element T NAME { KEY [timeout 10s] [comment "..."] [: VALUE], ... }
    delete element T NAME { KEY, ... }
    add rule T CHAIN STATEMENT...
    list ruleset | list tables | list table T        (read-only; the output is dump() text)

  Rule statements are expr.py's: matches `EXPR [==|!=|!] VALUE|@set|{ anonymous set }`,
  where EXPR is a concatenation (`a . b`) of ip/ip6 saddr|daddr, meta
  l4proto|mark, th|tcp|udp|sctp sport|dport, ct state|status|mark, fib
  saddr|daddr type, numgen random|inc mod N, optionally `& | ^ CONSTANT`;
  `EXPR vmap @map|{ k : verdict, ... }`; `meta mark set EXPR`; `update|add
  @set { EXPR }`; `dnat [ip|ip6] to ADDR[:PORT] | EXPR map @map`;
  `masquerade [fully-random|random|persistent]`; `reject [with ...]`;
  `counter [name "x"]`; `queue num N[-M] [bypass]`; verdicts accept, drop,
  return, continue, jump C, goto C. Anything else in a script is a syntax
  error naming its line and column, never silently ignored.

Kernel checks that catch real mistakes hold for scripts and Transactions
alike (checks.py, executor.py): missing objects, a key claimed with another
value, overlapping intervals, deleting a set or chain still referenced, a
set redeclared with another shape, datatype mismatches (lookups against
their sets, literals against their fields), a port mapping without a
transport protocol match, and chain validation (nat statements only where a
nat base chain of the right hook reaches them, reject only in
prerouting/input/forward/output, no jump loops, at most 16 levels of jumps).
"""

from .commands import Listing, TimedElement
from .memory import FakeNftables
from .parser import parse
from .state import ChainState, HeldElement, Learned, SetSpec, SetState, TableState
from .values import FLAG_TYPES, format_value, key_matches, parse_value

__all__ = [
    "FLAG_TYPES", "ChainState", "FakeNftables", "HeldElement", "Learned", "Listing", "SetSpec", "SetState",
    "TableState", "TimedElement", "format_value", "key_matches", "parse", "parse_value",
]
