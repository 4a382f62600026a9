"""The guard: everything that decides what may leave the server.

    policy    what runs: mode (off | flag | block), release (stream | unit | final), checks
    plan      a request's policy, what its checks may know, and its session (built in the route)
    checks    the checks: fed text incrementally, judging the whole at finish
    guard     one output's checks, and how far its text may be released
    release   one choice's guard applied to content, tool-call deltas and tokens
    facts     the consistency buffer (asserted JSON leaves by pointer); pointers, pinning and
              sessions are its parts: the streamed-JSON leaf tracker, enforce mode's schema
              pinning, the store that keeps facts across requests
    traces    what happened to a request, kept in a ring and served at /v1/traces/{id}

The rest of the gateway uses only the names exported here.
"""
from gateway.guard.checks import CheckContext, Violation
from gateway.guard.facts import Assertion, AssertionBuffer
from gateway.guard.guard import Guard
from gateway.guard.plan import GuardPlan, plan_guard
from gateway.guard.policy import Policy, PolicyError, merge_policy, server_policy
from gateway.guard.release import ChoiceRelease, GuardedChoice
from gateway.guard.sessions import InMemorySessionStore, SessionStore
from gateway.guard.traces import Trace, TraceRing, get_trace

__all__ = ["Assertion", "AssertionBuffer", "CheckContext", "ChoiceRelease", "Guard", "GuardPlan",
           "GuardedChoice", "InMemorySessionStore", "Policy", "PolicyError", "SessionStore",
           "Trace", "TraceRing", "Violation", "get_trace", "merge_policy", "plan_guard",
           "server_policy"]
