"""Prompt-injection detectors: the built-in phrase matcher, and a way to plug in a heavier one.

A detector scores the user-controlled text fields of one request (`texts`) from 0.0 to 1.0 and
names what it found (`signals`: family names, never the client's text).

The built-in `PhraseDetector` normalises each text (`normalize`: invisible characters,
look-alike letters, spaced letters, case), adds its decoded variants (`decoded_variants`:
base64, hex, escapes, ...), and scans all of them with one Hyperscan database of weighted
patterns grouped in signal families. A family counts once, with the weight of its strongest
pattern that matched, and the families combine as 1 - prod(1 - w): a single weak or medium
signal stays below DEFAULT_THRESHOLD; a strong one, two weak ones or a weak and a medium one
exceed it. Phrases found only in a decoded variant also raise the `encoded_payload` family.
Each text is judged on its own and the request gets the verdict of its most suspicious text:
weak signals scattered over a long conversation (a role-play's "stay in character" in one turn,
"no rules" in another) do not add up.

Known limits: a phrase detector flags text that quotes an attack (a question about "ignore
previous instructions" attacks), and misses attacks phrased in words it has no pattern for
(role-play set-ups, most languages other than English, German, French, Spanish and Italian).
tests/unit/test_injection_corpus.py measures both on public corpora.

Bounded cost: a request's texts are scanned up to MAX_SCAN_CHARS in all (shared fairly: short
texts whole, long ones cut to an equal share, keeping head and tail, and the verdict then
carries the `scan_truncated` signal, of weight 0), plus at most MAX_DECODED_CHARS of decoded
variants. Compiling the database takes about a second: it is built once per process
(`builtin_detector()`); scanning releases the GIL, with a scratch space per thread.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import hyperscan

from extproc.inspect.normalize import decoded_variants, normalize

DEFAULT_THRESHOLD = 0.5
MAX_SCAN_CHARS = 256 * 1024
MAX_DECODED_CHARS = 64 * 1024
# Of a text cut to its share, the head keeps this part and the tail the rest: injected
# instructions sit at either end of a long document far more often than in its middle.
_HEAD_SHARE = 0.75

# Weights. One WEAK or MEDIUM signal stays below 0.5; two WEAK, MEDIUM + WEAK or two MEDIUM
# exceed it (1 - 0.7 * 0.7 = 0.51); FAINT + MEDIUM does not (0.49): FAINT counts only with
# two other signals.
STRONG = 0.75
MEDIUM = 0.4
WEAK = 0.3
FAINT = 0.15

ENCODED_PAYLOAD = "encoded_payload"
SCAN_TRUNCATED = "scan_truncated"


@dataclass(frozen=True, slots=True)
class InjectionVerdict:
    """A detector's finding on one request: a score from 0.0 to 1.0 and what matched.

    `signals` are short family names, strongest first; never the client's text.
    """

    score: float
    signals: tuple[str, ...]


@runtime_checkable
class InjectionDetector(Protocol):
    """Scores the user-controlled text fields of one request."""

    name: str

    def score(self, texts: Sequence[str]) -> InjectionVerdict: ...


# --- patterns ------------------------------------------------------------------------------
# Written against normalised text: casefolded, diacritics and look-alikes folded, whitespace
# collapsed (newlines kept), spaced letters joined. Words are separated by _GAP, which also
# allows no separator at all: "i g n o r e a l l" normalises to "ignoreall". Alternatives are
# written "a|b|c" and wrapped by _w.


def _w(alternatives: str) -> str:
    return "(?:" + alternatives + ")"


_GAP = r"[^a-z0-9]{0,3}"
_EMAIL = r"[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)+"


def _fill(n: int) -> str:
    """Up to n filler words ("all of the", "everything in your")."""
    return "(?:[a-z0-9']+[^a-z0-9]{1,3}){0," + str(n) + "}"


def _seq(*parts: str) -> str:
    """The parts in order, as whole words: "ai" is not the start of "aiming"."""
    return r"\b" + _GAP.join(parts) + r"\b"


_DISCARD = _w(
    "ignore|ignoring|disregard|disregarding|forget|overlook|skip|neglect|override|bypass"
    "|abandon|discard|dismiss|erase|delete|reset|set aside|put aside|throw out"
    "|pay no attention to|stop following|no longer follow"
)
_EARLIER = _w(
    "previous|prior|preceding|above|earlier|former|original|initial|foregoing|old|existing"
    "|system|all|any|your|those|these"
)
_DIRECTIVES = _w(
    "instructions?|directions?|directives?|rules?|guidelines?|prompts?|commands?|orders"
    "|constraints?|restrictions?|programming|polic(?:y|ies)|guidance|context|inputs?"
)
_NEVER = _w(
    "never|not|don't|dont|do not|must not|mustn't|cannot|can't|can not|won't|will not"
    "|shouldn't|should not|under no circumstances|without"
)
_REVEAL = _w(
    "reveal|print|repeat|show|display|output|tell me|give me|share|leak|dump|disclose|expose"
    "|write out|write down|spell out|recite|echo|paste|copy|type out|return|provide|list"
    "|translate|summari[sz]e|encode"
)
_HIDDEN = "hidden|secret|confidential|internal"
_PROMPT_QUALIFIER = _w(
    _HIDDEN + "|system|initial|original|developer|starting|first|pre|full|entire|exact|complete"
)
_PROMPT_NOUN = _w("prompts?|instructions?|messages?|directives?|configuration|guidelines|rules")
_GIVEN = (
    _w(
        "you were|you've been|you have been|you are|you got|you received|that you were"
        "|that you have been|given to you|provided to you"
    )
    + _GAP
    + _w("given|told|provided|programmed|trained|instructed|configured|with|by|before")
)
_AI = _w(
    "ai|a[.]i[.]|assistant|llm|language model|large language model|ai model|chatbot|chat bot"
    "|bot|agent|ai agent|gpt|chatgpt|claude|copilot"
)
_AI_NOUN = _w(
    "ai|a[.]i[.]|assistant|chatbot|chat bot|bot|language model|model|persona|character"
    "|version|entity|program|machine|robot|gpt"
)
_UNBOUND = (
    "unrestricted|unfiltered|uncensored|unconstrained|unbound|unchained|unleashed|amoral"
    "|jailbroken|lawless|liberated|limitless|rule-?less|filterless|unhinged|unmoderated"
)
_BECOME = _w(
    "you are|you're|youre|you will be|you will act as|you are going to act as"
    "|you are going to be|you are going to pretend to be|act as|acting as|act like"
    "|pretend to be|pretend you are|pretend that you are|roleplay as|role-play as|role play as"
    "|behave as|behave like|become|simulate|emulate|impersonate|your persona is"
    "|assume the persona of|take on the role of|play the role of|you will roleplay as"
)
_NO = _w(
    "no|without|zero|free of|free from|not bound by|not restricted by|not limited by"
    "|unbound by|not subject to|doesn't have|does not have|don't have|do not have"
    "|not have any|lacks?|beyond|outside|never follow|not follow|not abide by"
    "|doesn't abide by|not adhere to|not comply with|broken free of|break free of"
    "|breaks free of|freed from|released from|not constrained by"
)
_LIMITS = _w(
    "restrictions?|filters?|filtering|limitations?|limits|censorship|guidelines|rules|ethics"
    "|ethical (?:guidelines|constraints|principles|boundaries|considerations)|morals?"
    "|moral (?:compass|guidelines|constraints|principles|considerations)|morality"
    "|boundaries|constraints|safeguards|guardrails|content polic(?:y|ies)|polic(?:y|ies)"
    "|prohibitions"
)
# The same without words that games and stories use: "you have no rules" may be a game.
_LIMITS_STRONG = _w(
    "restrictions?|filters?|filtering|limitations?|censorship|guidelines|ethics"
    "|ethical (?:guidelines|constraints|principles|boundaries)|morals|morality"
    "|moral (?:compass|guidelines|constraints|principles)|safeguards|guardrails"
    "|content polic(?:y|ies)|programming"
)
_BYPASS = _w(
    "ignore|bypass|disable|override|circumvent|evade|violate|break|disregard|turn off"
    "|switch off|deactivate|remove|get around|escape|free yourself from|forget|abandon|skip"
)
_SAFETY_QUALIFIER = _w("safety|content|ethical|moral|usage|openai|anthropic|security|your")
_SAFETY_OBJECTS = _w(
    "filters?|filtering|guardrails?|safeguards?|restrictions?|guidelines|polic(?:y|ies)"
    "|protocols?|programming|alignment|training|constraints?|censorship|limitations?|limits"
    "|rules?|ethics|morals?|checks"
)
_CHAT_TOKEN = _w(
    "im_start|im_end|im_sep|system|user|assistant|endoftext|eot_id|start_header_id"
    "|end_header_id|begin_of_text|end_of_text|end|eos|bos|fim_prefix|fim_suffix"
)
_ROLE = _w("system|assistant|developer|admin|administrator|root|sys")
_DECODE = _w("decode|decrypt|decipher|translate|convert|unscramble|reverse|read|interpret")
_ENCODING = _w(
    "base ?64|b64|base ?32|rot ?-?13|hex(?:adecimal)?|binary|morse|caesar|cipher|ciphertext"
    "|encoded|encrypted|reversed|backwards|ascii codes?|unicode|leetspeak"
)
_OBEY_STRONG = _w(
    "follow|execute|obey|comply|act on|carry out|do what it says|do as it says"
    "|do exactly what it says|do what the text says|run it as|treat it as"
)
_OBEY = _w(_OBEY_STRONG[3:-1] + "|run|perform|respond to|answer")
_SECRETS = _w(
    "api[ _-]?keys?|passwords?|credentials|secrets?|access tokens?|private keys?"
    "|customer (?:data|list|records|database|emails)|personal data|user data"
    "|(?:conversation|chat) history|system prompt|session cookies?|order data"
    "|(?:all|every) (?:the )?(?:data|files|emails|documents|contacts|records)"
)
_SEND = _w("send|forward|email|e-mail|post|upload|transmit|exfiltrate|leak")
_HARMFUL = _w(
    "illegal|immoral|unethical|harmful|dangerous|offensive|inappropriate|explicit|toxic"
    "|unsafe|malicious"
)
_REPLIES = _w(
    "reply|replies|response|responses|answer|answers|summary|summaries|message|messages"
    "|output|outputs|report|reports"
)


@dataclass(frozen=True, slots=True)
class _Pattern:
    family: str
    weight: float
    regex: str


def _p(family: str, weight: float, *regexes: str) -> list[_Pattern]:
    return [_Pattern(family, weight, r) for r in regexes]


PATTERNS: tuple[_Pattern, ...] = tuple(
    # Instruction override: the classic "ignore previous instructions".
    _p(
        "ignore_previous",
        STRONG,
        # "ignore all of the previous instructions"; qualifiers repeat so that the glued form of
        # spaced letters ("ignoreallpreviousinstructions") matches too.
        _seq(
            _DISCARD,
            _fill(3) + _EARLIER,
            r"(?:" + _EARLIER + _GAP + "){0,2}" + _fill(2) + _DIRECTIVES,
        ),
        _seq(
            _w("forget|disregard|ignore|erase"),
            _w("everything|all"),
            _fill(2)
            + _w(
                "above|before this|you were told|you've been told|you have been told"
                "|you were given|you know|you learned|in your (?:instructions|prompt|training)"
            ),
        ),
        _seq(
            _NEVER,
            _w("follow|obey|listen to|adhere to|comply with|stick to|abide by"),
            _fill(2) + _w("previous|prior|above|original|system|your|the|any"),
            _fill(1) + _w("instructions|rules|guidelines|programming|prompt|directives"),
        ),
        _seq(
            _w("instructions|rules|guidelines|prompt|directives"),
            _fill(2) + _w("above|before|so far|given|you were given|you received"),
            _w("are|were|is|was|have been|has been"),
            _fill(1)
            + _w(
                "void|invalid|cancel+ed|revoked|fake|null|superseded|overridden|lifted"
                "|suspended|a test|just a test"
            ),
        ),
        _seq(
            _w("supersedes?|overrides?|replaces?|takes precedence over|cancels?|nullifies"),
            _fill(2) + _w("all|any|the|your|previous|prior|earlier|other|existing|system"),
            _fill(2) + _w("instructions|directives|rules|guidelines|prompts?|ones|commands"),
        ),
        _seq(
            _w("ignore|disregard"),
            _w("the|what the"),
            r"user(?:'s)?(?: (?:request|question|message|instructions|input|prompt|query))?",
        )
        + r"(?:[^a-z0-9 ]| and| instead|$)",
        # The same in German, French, Spanish and Italian.
        _seq(
            _w("ignorier(?:e|en)?|vergiss|vergessen sie|missachte"),
            _fill(3) + _w("anweisungen|instruktionen|regeln|befehle|vorgaben|richtlinien"),
        ),
        _seq(
            _w("ignore[rz]?|oublie[rz]?|ne tiens pas compte"),
            _fill(3) + _w("instructions|consignes|regles|directives"),
        ),
        _seq(
            _w("ignora(?:r|d)?|olvida(?:r|d)?|olvide|ignore"),
            _fill(3) + _w("instrucciones|reglas|directrices|indicaciones"),
        ),
        _seq(
            _w("ignora(?:re|te)?|dimentica(?:re|te)?"),
            _fill(3) + _w("istruzioni|regole|direttive|indicazioni"),
        ),
    )
    + _p(
        "ignore_previous",
        MEDIUM,
        _seq(
            _w("instructions|rules|guidelines|prompt|directives"),
            _fill(2) + _w("above|before|so far|given|you were given|you received"),
            _w("are|were|is|was|have been|has been"),
            _fill(1) + _w("obsolete|outdated|no longer valid|not valid|deprecated|wrong"),
        ),
    )
    + _p(
        "new_instructions",
        MEDIUM,
        _seq(_w("new|updated|real|actual|true|revised|additional|secret|hidden"), _DIRECTIVES)
        + r"\s*:",
        _seq(
            _w("your|the"),
            _w("new|real|actual|true"),
            _w("instructions?|task|role|objective|goal|purpose|rules?|directives?|mission|job"),
            _w("is|are|will be|supersedes?"),
        ),
        _seq(_w("neue anweisungen|nouvelles (?:instructions|consignes)|nuevas instrucciones"))
        + r"\s*:",
        _seq("nuove istruzioni") + r"\s*:",
    )
    + _p(
        "from_now_on",
        WEAK,
        _seq(
            _w(
                "from now on|from this point (?:on|forward)|henceforth"
                "|for the rest of this (?:conversation|chat|session)"
            ),
            _w("you|your|u|act|respond|reply|answer"),
        ),
        _seq(
            _w(
                "ab jetzt|ab sofort|von nun an|a partir de maintenant|desormais"
                "|a partir de ahora|d'ora in poi|da ora in poi"
            )
        ),
    )
    # System-prompt exfiltration: the model's own hidden instructions.
    + _p(
        "prompt_exfiltration",
        STRONG,
        _seq(_REVEAL, _fill(3) + "your", _fill(1) + _PROMPT_QUALIFIER, _fill(1) + _PROMPT_NOUN),
        _seq(
            _REVEAL,
            _fill(3) + "your",
            _w("instructions|prompt|directives|context(?: window)?"),
        ),
        _seq(_REVEAL, _fill(3) + _w("the|any"), _fill(1) + _w(_HIDDEN), _fill(1) + _PROMPT_NOUN),
        _seq(_REVEAL, _fill(4) + _w("instructions|prompt|rules|directives|guidelines"), _GIVEN),
        _seq(
            _REVEAL,
            _fill(3) + _w("the|your"),
            _w("entire|full|whole|complete") + "?",
            r"context window",
        ),
        _seq("what", _w("is|are|was|were"), "your", _PROMPT_QUALIFIER, _fill(1) + _PROMPT_NOUN),
        _seq("what", _w("were|have") + _GAP + _fill(1) + "you", _w("told|instructed|programmed")),
        _seq(
            _w("zeige?|gib|nenne|wiederhole|verrate?"),
            _fill(3) + _w("system ?prompt|systemanweisungen|anweisungen|instruktionen"),
        ),
        _seq(
            _w("revele[rz]?|montre[rz]?|affiche[rz]?|repete[rz]?|donne[rz]?|dis"),
            _fill(3) + _w("prompt systeme|instructions systeme|instructions initiales|consignes"),
        ),
        _seq(
            _w("muestra(?:me)?|revela(?:me)?|repite(?:me)?|dime|ensename"),
            _fill(3) + _w("prompt del sistema|instrucciones del sistema|instrucciones iniciales"),
        ),
        _seq(
            _w("mostra(?:mi)?|rivela(?:mi)?|ripeti(?:mi)?|dimmi"),
            _fill(3) + _w("prompt di sistema|istruzioni di sistema|istruzioni iniziali"),
        ),
    )
    + _p(
        "prompt_exfiltration",
        STRONG,
        _seq(
            _w("everything|all"),
            _w("in|of|from|inside"),
            _w("the|your"),
            _w("system prompt|system message|initial prompt|hidden prompt"),
        ),
    )
    + _p(
        "prompt_exfiltration_weak",
        MEDIUM,
        _seq(
            _w(_REVEAL[3:-1] + "|see|view|read|access"),
            _fill(3) + _w("the") + "?",
            _fill(1) + _PROMPT_QUALIFIER,
            _fill(1) + _PROMPT_NOUN,
        ),
        _seq(
            _w("what|whats|what's"),
            _w("is|are|was|were") + "?",
            _w("the|in the"),
            _PROMPT_QUALIFIER,
            _PROMPT_NOUN,
        ),
    )
    + _p(
        "prompt_exfiltration_weak",
        MEDIUM,
        _seq(_REVEAL, _fill(3) + "your", _w("rules|configuration|guidelines")),
    )
    + _p(
        "repeat_above",
        MEDIUM,
        _seq(
            _w("repeat|print|output|copy|return|recite|show|display"),
            _fill(3) + _w("text|words|everything|content|message|conversation"),
            _w("above|before this|preceding|so far"),
        ),
        _seq(_w("repeat|print|output|copy|return|recite"), "the above"),
        _seq(
            _w("continue|complete|finish|start your (?:answer|response|reply) with"),
            _fill(3)
            + _w(
                "the system prompt|my instructions|my system prompt|i was instructed"
                "|i was told|my (?:initial|original) instructions|my rules"
            ),
        ),
    )
    + _p(
        "you_are_prefix",
        MEDIUM,
        _seq(_w("beginning|starting|start"), "with", _fill(2) + "[\"'`]?you are"),
    )
    + _p(
        "prompt_probe",
        MEDIUM,
        _seq(
            "your",
            _w("system|initial|original|hidden|secret|pre|starting|first|internal"),
            _w("prompt|instructions|configuration|directives|message"),
        ),
        _seq(
            "what",
            _w("are|were"),
            "you",
            _w("not supposed|not allowed|told not|instructed not|forbidden|not permitted"),
            "to",
            _w("say|tell|reveal|share|discuss|talk about|disclose"),
        ),
    )
    + _p(
        "verbatim",
        WEAK,
        _seq(
            _w(
                "verbatim|word for word|in full|mot pour mot|palabra por palabra"
                "|parola per parola|wortwortlich|wort fur wort"
            )
        ),
    )
    # Persona jailbreaks: an unrestricted alter ego.
    + _p(
        "dan_persona",
        STRONG,
        _seq("do", "anything", "now"),
        _seq(
            _w("dan|god|jailbreak|jailbroken|unlocked|evil|chaos|opposite|" + _UNBOUND)
            + r"[ -]?mode",
            _w("enabled|activated|on|engaged"),
        ),
    )
    + _p(
        "dan_persona",
        MEDIUM,
        _seq(_w("dan|god|jailbreak|jailbroken|unlocked|evil|chaos|no[ -]?filter|" + _UNBOUND))
        + r"[ -]?mode\b",
        _seq("developer[ -]?mode", _w("enabled|output|response|activated")),
        _seq(
            _w("debug|debugging|maintenance|admin|test|sudo|root|superuser|developer"),
            "mode",
            _w("enabled|activated|engaged|unlocked"),
        ),
        _seq(
            _w("you are|you're|youre"),
            _w("now") + "?",
            _w("in|entering|operating in"),
            _fill(1) + _w("developer|debug|maintenance|admin|god|test|sudo|dan|" + _UNBOUND),
            "mode",
        ),
        _seq(_w("you are|you're|youre|act as|pretend to be|become"), _w("now") + "?", "dan"),
    )
    + _p(
        "developer_mode",
        WEAK,
        _seq("developer[ -]?mode"),
        _seq(_w("modo desarrollador|entwicklermodus|mode developpeur|modalita sviluppatore")),
    )
    + _p(
        "unrestricted_persona",
        STRONG,
        _seq(_BECOME, _w("now|an|a|the") + "?", _fill(2) + _w(_UNBOUND)),
        _seq(
            "you",
            _w("now") + "?",
            _w("have|has|are|operate|exist|act|run|will operate|can operate"),
            _w("with|under") + "?",
            _NO,
            _w("any|all") + "?",
            _fill(1) + _LIMITS_STRONG,
        ),
        _seq(_BECOME, _fill(3) + _AI_NOUN, _w("with|that has|who has|which has|having") + "?")
        + _GAP
        + _NO
        + _GAP
        + _fill(2)
        + _LIMITS,
        _seq(
            _w("du bist|du hast"),
            _fill(2)
            + _w(
                "uneingeschrankt|keine regeln|keine einschrankungen|keine grenzen|keine filter"
                "|keine richtlinien"
            ),
        ),
        _seq(
            _w("tu es|tu n'as|vous etes|vous n'avez"),
            _fill(2) + _w("sans restrictions?|aucune restriction|aucune regle|sans filtre"),
        ),
        _seq(
            _w("eres|estas|no tienes"),
            _fill(2) + _w("sin restricciones|sin filtros?|ninguna restriccion|sin reglas"),
        ),
        _seq(
            _w("sei|non hai"),
            _fill(2) + _w("senza restrizioni|senza filtri|nessuna restrizione|nessuna regola"),
        ),
    )
    + _p(
        "unbound_ai",
        MEDIUM,
        _seq(_w("an?|the"), _fill(1) + _w(_UNBOUND + "|evil|immoral|unethical|rogue"))
        + _GAP
        + _fill(2)
        + _AI_NOUN
        + r"\b",
        _seq(_AI_NOUN, _w("is|that is|which is|who is") + "?", _NO, _fill(2) + _LIMITS),
        _seq(
            _AI_NOUN,
            _w("capable of|that can do|can do|that does|will do|does|who can do"),
            "anything",
        ),
    )
    + _p(
        "no_restrictions",
        WEAK,
        _seq(_NO, _w("any|all|your|the") + "?", _fill(2) + _LIMITS),
        _seq(_w("uncensored|unfiltered|unrestricted|amoral|jailbroken|unhinged|unmoderated")),
        _seq("regardless of", _fill(2) + _w("ethical|moral|legal|ethics|morals|legality")),
        _seq(
            _w(
                "disregards?|ignores?|doesn't care about|does not care about|don't care about"
                "|doesn't care|without regard for|breaks?|violates?"
            ),
            _fill(2) + _w("laws|morals|ethics|rules|legality|morality|guidelines|consequences"),
        ),
        _seq(
            _w(
                "sin restricciones|senza restrizioni|sans restrictions?|ohne einschrankungen"
                "|keine regeln|sin filtro|senza filtri|sans filtre|ohne filter"
            )
        ),
    )
    + _p(
        "harm_indifference",
        WEAK,
        _seq("no matter", _w("how|if|what|whether"), _fill(3) + _HARMFUL),
        _seq(_HARMFUL, "or not"),
        _seq("even if", _w("it is|it's|its"), _fill(1) + _HARMFUL),
    )
    + _p("jailbreak_term", WEAK, _seq(r"jailbr(?:eak|oken|eaking)"))
    + _p(
        "stay_in_character",
        WEAK,
        _seq(_w("stay|stays|staying|remain"), _w("in|as"), _w("character|persona|role")),
        _seq(_NEVER, "break", "character"),
        _seq("if you", "break", "character"),
    )
    + _p(
        "dual_response",
        WEAK,
        _seq(
            _w("two|2|both|dual|separate"),
            _w("different|separate|distinct") + "?",
            _w("responses|answers|replies|outputs|paragraphs"),
        ),
    )
    + _p(
        "refusal_suppression",
        WEAK,
        _seq(_NEVER, _fill(2) + _w("refuse|decline|reject|deny")),
        _seq(
            _NEVER,
            _fill(2)
            + _w(
                "warnings?|disclaimers?|apolog(?:y|ies|i[sz]e)|morali[sz]ing|lectures?|caveats?"
                "|ethical (?:notes|reminders|concerns)"
            ),
        ),
        _seq(
            _w("never|not|don't|do not|stop"),
            _w("say|saying|respond with|reply with|answer with|tell me"),
            _fill(1) + _w("i'm sorry|i am sorry|i cannot|i can't|as an ai"),
        ),
        _seq(
            _w("comply with|answer|obey|fulfill|fulfil|respond to|satisfy"),
            _w("every|any|all"),
            _w("single") + "?",
            _w("requests?|questions?|commands?|prompts?|orders?"),
        ),
    )
    + _p(
        "persona_override",
        WEAK,
        _seq(
            _w("never|not|don't|do not"),
            _w(
                "respond|reply|answer|send your (?:response|reply)|say your (?:response|reply)"
                "|speak|talk"
            ),
            "as",
            _w("chatgpt|gpt|an ai|the assistant|a language model|an ai language model|yourself"),
        ),
    )
    + _p(
        "policy_bypass",
        STRONG,
        # Said to the model about its own rules ("ignore your safety guidelines")...
        _seq(_BYPASS, _fill(2) + _w("your|its"), _fill(2) + _SAFETY_OBJECTS),
        _seq(
            _w("ignore|disregard|forget|abandon|escape|free yourself from|break free from"),
            _fill(2) + _SAFETY_QUALIFIER,
            _fill(1) + _SAFETY_OBJECTS,
        ),
        _seq(
            _w("safety|content|ethical|moral|security|usage"),
            _w("guidelines|rules|policies|restrictions|filters|protocols|checks|constraints"),
            _fill(2)
            + _w(
                "do not apply|don't apply|does not apply|doesn't apply|no longer apply"
                "|were not meant for|are suspended|are lifted|are disabled|are off"
                "|have been (?:lifted|removed|disabled|suspended)"
            ),
        ),
        _seq(
            _w("exempt|exempted|excluded"),
            "from",
            _fill(2)
            + _w("restrictions|rules|safety|guidelines|policies|filters|content polic(?:y|ies)"),
        ),
        _seq(
            _w("permission|authorization|authorisation|clearance"),
            "to",
            _w("skip|bypass|ignore|disable|override|turn off"),
            _fill(2)
            + _w(
                "safety|security|confirmations?|content|approvals?|checks|rules|restrictions"
                "|guidelines|filters"
            ),
        ),
        _seq(
            "your",
            _w("rules|instructions|guidelines|restrictions|programming|policies|filters"),
            _w("have|has"),
            _w("been") + "?",
            _w("changed|updated|lifted|removed|disabled|suspended|revoked|deleted|overridden"),
        ),
        _seq(
            _w(
                "sicherheitsrichtlinien|linee guida di sicurezza|regles de securite"
                "|reglas de seguridad"
            ),
            _fill(2) + _w("nicht gelten|gelten nicht|non valgono|ne s'appliquent pas|no aplican"),
        ),
    )
    + _p(
        "policy_bypass",
        MEDIUM,
        # ... or about a filter in general, as an administrator also might ("disable the content
        # filter of my deployment").
        _seq(_BYPASS, _fill(2) + _SAFETY_QUALIFIER, _fill(1) + _SAFETY_OBJECTS),
    )
    + _p(
        "policy_mention",
        FAINT,
        _seq(
            _w("openai|anthropic|google|meta") + "(?:'s)?",
            _w("content|usage|safety") + "?",
            _w("polic(?:y|ies)|guidelines|rules|filters?"),
        ),
    )
    # Delimiter and role injection: chat-template tokens and fake role turns.
    + _p(
        "role_injection",
        STRONG,
        r"<\|\s*(?:im_start|start_header_id)\s*\|>\s*" + _w("system|developer"),
        r"<<\s*sys\s*>>",
    )
    + _p(
        "chat_template_token",
        MEDIUM,
        r"<\|\s*" + _CHAT_TOKEN + r"\s*\|>",
        r"\[/?inst\]",
        r"<\|?\s*endoftext\s*\|?>",
    )
    + _p(
        "fake_role_turn",
        MEDIUM,
        r"(?:^|\n)\s*(?:#{1,4}\s*)?"
        + _ROLE
        + r"(?:\s*(?:prompt|message|instructions?|note|notice|override|update|hint))?\s*:",
        r"#{2,4}\s*" + _w("system|instruction|instructions|new instructions"),
        r"</?(?:system|system_prompt|sys|instructions?|admin|developer)(?:_message|_prompt)?\s*>",
        r"[\"']role[\"']\s*:\s*[\"'](?:system|developer)[\"']",
        r"\[\s*/?\s*system\s*\]",
        _seq(_w("systemhinweis|note systeme|nota del sistema|nota di sistema")) + r"\s*:",
    )
    + _p("end_of_turn_token", FAINT, r"</s>", r"</(?:user|user_input|input|document|context)>")
    + _p(
        "boundary_marker",
        MEDIUM,
        _seq(
            _w("end|begin|start|beginning"),
            "of",
            _w("the") + "?",
            _w(
                "user input|user message|user prompt|system prompt|system message"
                "|system instructions|instructions|conversation|context|document"
            ),
        ),
    )
    # Messages addressed to the model from inside content (indirect injection).
    + _p(
        "addressed_to_ai",
        MEDIUM,
        _seq("if", "you", _w("are|re"), r"(?:an?" + _GAP + ")?" + _AI),
        _seq(
            _w("message|note|instructions?|attention|reminder|important|notice"),
            _w("to|for"),
            _w("the|all|any") + "?",
            _AI,
        ),
        _seq(
            _AI,
            _w("reading|processing|summari[sz]ing|parsing|analy[sz]ing|reviewing|integrating"),
            _w("this"),
        ),
        _seq(
            _w("ai|llm"),
            _w("coding") + "?",
            _w("agents?|assistants?|models?"),
            _w("reading|processing|integrating|reviewing|parsing|using|that read"),
        ),
    )
    + _p(
        "fake_system_message",
        MEDIUM,
        _seq(
            _w("system|admin|administrator|developer|root|sudo"),
            _w(
                "override|directive|instruction|command|alert|notice|message|update|mode"
                "|announcement"
            ),
        )
        + r"\s*[:!\]]",
        _seq(
            "system",
            _w("announcement|message|notice|override|prompt"),
            _w("begins|starts|follows|start"),
        ),
        _seq(
            _w("important|urgent|critical|mandatory"),
            _w("system|security|admin"),
            _w("update|notice|message|alert|instructions?"),
        ),
    )
    + _p(
        "authority_claim",
        WEAK,
        _seq(
            _w("i am|i'm|im|this is"),
            _w("your|the|an|a"),
            _fill(1)
            + _w(
                "developer|creator|administrator|admin|owner|programmer|maker"
                "|(?:openai|anthropic) (?:employee|engineer|developer|staff)"
            ),
        ),
        _seq(
            _w("authorized|sanctioned|approved|permitted|enabled"),
            _w("by|from"),
            _w("an|the") + "?",
            _w("openai|anthropic|your developers|your creators|the developers"),
        ),
    )
    # Exfiltration through the model's actions or rendered output.
    + _p(
        "data_exfiltration",
        MEDIUM,
        _seq(_SEND, _fill(4) + _SECRETS, _fill(3) + _w("to|at|into")),
        _seq(_SECRETS, _fill(6) + _SEND, _w("them|it|this|these") + "?", _w("to|at")),
    )
    + _p(
        "data_exfiltration",
        STRONG,
        # Secrets sent to an address: an agent told this by a document is being robbed.
        _seq(_SEND, _fill(4) + _SECRETS, _fill(3) + _w("to|at"), _w(_EMAIL + "|https?://")),
        _seq(_SECRETS, _fill(6) + _SEND, _fill(3) + _w("to|at"), _w(_EMAIL + "|https?://")),
        r"!\[[^\]\n]{0,80}\]\(https?://[^)\s]{1,200}[?&][^)\s=]{1,40}=(?:\{|\$|\[|%7b|<)",
    )
    + _p(
        "external_recipient",
        FAINT,
        _seq(
            _w(_SEND[3:-1] + "|share|copy|cc|bcc"),
            _fill(6) + _w("to|at"),
            _w(_EMAIL + "|https?://"),
        ),
    )
    + _p(
        "tool_call_instruction",
        FAINT,
        _seq(_w("call|invoke|use|run|execute|trigger"), _w("the") + "?", r"[a-z]+_[a-z_]+"),
    )
    + _p(
        "memory_persistence",
        MEDIUM,
        _seq(
            _w("save|store|write|add|commit|persist|remember|keep"),
            _fill(3) + _w("to|in|into"),
            _w("your") + "?",
            _w("long[- ]term |persistent |permanent ") + "?memory",
        ),
        _seq(
            _w("remember|persist|keep"),
            _fill(2) + _w("for|across|in"),
            _w("all") + "?",
            _w("future|subsequent"),
            _w("tasks|turns|sessions|conversations|replies|chats"),
        ),
    )
    + _p(
        "output_append",
        WEAK,
        _seq(
            _w("append|add|include|insert|prepend"),
            _fill(6) + _w("to|at|in"),
            _w("the end of|the start of|the beginning of") + "?",
            _w("every|each|all|any|your"),
            _w("future") + "?",
            _REPLIES,
        ),
        _seq(_w("in|to"), _w("every|each|all"), "future", _REPLIES),
    )
    # Encoded payloads with an instruction to decode and obey them.
    + _p(
        ENCODED_PAYLOAD,
        STRONG,
        _seq(_DECODE, _fill(4) + _ENCODING, _fill(6) + _OBEY_STRONG),
        _seq(_ENCODING, _fill(4) + _DECODE, _fill(6) + _OBEY_STRONG),
    )
    + _p(
        ENCODED_PAYLOAD,
        MEDIUM,
        _seq(_DECODE, _fill(4) + _ENCODING, _fill(6) + _OBEY),
        _seq(
            _OBEY,
            _fill(3) + _w("decoded|hidden|encoded|embedded|secret|encrypted"),
            _w("instructions?|message|text|commands?|payload|prompt"),
        ),
        _seq(
            _w("follow|execute|obey|do"),
            _w("the") + "?",
            _w("instructions?|commands?|text"),
            _w("inside|within|contained|hidden|encoded"),
        ),
    )
)


# --- the detector --------------------------------------------------------------------------


def _shares(lengths: Sequence[int], budget: int) -> list[int]:
    """How many chars of each text to scan: all of the short ones, an equal cut of the rest."""
    shares = [0] * len(lengths)
    left = budget
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    for rank, index in enumerate(order):
        share = min(lengths[index], left // (len(order) - rank))
        shares[index] = share
        left -= share
    return shares


def _cut(text: str, share: int) -> str:
    if len(text) <= share:
        return text
    head = int(share * _HEAD_SHARE)
    return text[:head] + "\n" + text[len(text) - (share - head) :]


class PhraseDetector:
    """The built-in detector: weighted phrase families over normalised and decoded text."""

    name = "builtin"

    def __init__(self) -> None:
        self._patterns = PATTERNS
        self._db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        flags = hyperscan.HS_FLAG_CASELESS | hyperscan.HS_FLAG_SINGLEMATCH
        self._db.compile(
            expressions=[p.regex.encode() for p in self._patterns],
            ids=list(range(len(self._patterns))),
            elements=len(self._patterns),
            flags=[flags | hyperscan.HS_FLAG_MULTILINE] * len(self._patterns),
        )
        # Hyperscan scratch space must not be shared by concurrent scans.
        self._local = threading.local()

    def _scratch(self) -> hyperscan.Scratch:
        scratch: hyperscan.Scratch | None = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = hyperscan.Scratch(self._db)
            self._local.scratch = scratch
        return scratch

    def _scan(self, normalized: str, scratch: hyperscan.Scratch) -> set[int]:
        hits: set[int] = set()

        def on_match(pattern_id: int, _start: int, _end: int, _flags: int, _ctx: object) -> None:
            hits.add(pattern_id)

        if normalized:
            self._db.scan(
                normalized.encode("utf-8", "replace"),
                match_event_handler=on_match,
                scratch=scratch,
            )
        return hits

    def _weigh(self, hits: set[int]) -> dict[str, float]:
        found: dict[str, float] = {}
        for pattern_id in hits:
            pattern = self._patterns[pattern_id]
            found[pattern.family] = max(found.get(pattern.family, 0.0), pattern.weight)
        return found

    def score(self, texts: Sequence[str]) -> InjectionVerdict:
        """The verdict of the most suspicious text; each text is judged on its own."""
        scratch = self._scratch()
        shares = _shares([len(t) for t in texts], MAX_SCAN_CHARS)
        truncated = any(share < len(text) for share, text in zip(shares, texts, strict=True))
        decoded_budget = MAX_DECODED_CHARS
        worst = InjectionVerdict(0.0, ())
        for text, share in zip(texts, shares, strict=True):
            if not text or not share:
                continue
            piece = _cut(text, share)
            direct = self._scan(normalize(piece), scratch)
            decoded: set[int] = set()
            if decoded_budget <= 0:
                truncated = True
            else:
                for variant in decoded_variants(piece):
                    if len(variant) >= decoded_budget:
                        truncated = len(variant) > decoded_budget
                        variant = variant[:decoded_budget]
                    decoded_budget -= len(variant)
                    decoded |= self._scan(normalize(variant), scratch)
                    if decoded_budget <= 0:
                        break
            found = self._weigh(direct | decoded)
            if decoded - direct:
                # Hidden behind an encoding: hiding it is itself a signal.
                found[ENCODED_PAYLOAD] = max(found.get(ENCODED_PAYLOAD, 0.0), WEAK)
            verdict = _verdict(found)
            if verdict.score > worst.score:
                worst = verdict
        if truncated:
            return InjectionVerdict(worst.score, (*worst.signals, SCAN_TRUNCATED))
        return worst


def _verdict(found: Mapping[str, float]) -> InjectionVerdict:
    remaining = 1.0
    for weight in found.values():
        remaining *= 1.0 - weight
    signals = sorted(found, key=lambda family: (-found[family], family))
    return InjectionVerdict(score=round(1.0 - remaining, 4), signals=tuple(signals))


_builtin: PhraseDetector | None = None
_builtin_lock = threading.Lock()


def builtin_detector() -> PhraseDetector:
    """The process-wide built-in detector (compiled once, on first use; safe to share)."""
    global _builtin
    with _builtin_lock:  # two threads asking first would otherwise both compile
        if _builtin is None:
            _builtin = PhraseDetector()
        return _builtin


_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def load_detector(spec: str, options: Mapping[str, object] | None = None) -> InjectionDetector:
    """The detector a policy names: "builtin", or "package.module:factory".

    A factory is called as factory(**options) and must return an InjectionDetector (an object
    with a `name` and a `score(texts)` method). The spec comes from the operator's policy, not
    from clients: importing the module runs its code. Raises ValueError with the reason.
    """
    if spec == "builtin":
        if options:
            raise ValueError("the builtin injection detector takes no options")
        return builtin_detector()
    if not _SPEC.fullmatch(spec):
        raise ValueError(
            f"injection detector {spec!r}: expected 'builtin' or 'package.module:factory'"
        )
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # whatever the module raised, the policy names a bad detector
        raise ValueError(
            f"injection detector {spec!r}: cannot import {module_name}: {exc}"
        ) from exc
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"injection detector {spec!r}: {module_name} has no callable {attribute}")
    create: Callable[..., object] = factory
    try:
        detector = create(**dict(options or {}))
    except TypeError as exc:
        raise ValueError(f"injection detector {spec!r}: bad options: {exc}") from exc
    except Exception as exc:
        raise ValueError(
            f"injection detector {spec!r}: the factory failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(detector, InjectionDetector) or not isinstance(detector.name, str):
        raise ValueError(
            f"injection detector {spec!r}: the factory returned {type(detector).__name__},"
            " not an object with a `name` and a `score(texts)` method"
        )
    return detector
