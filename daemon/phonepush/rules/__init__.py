"""Rules compiled once per load or reload: a :class:`RuleBook` of :class:`CompiledRule`."""

from phonepush.rules.book import CompiledRule, RuleBook, RuleSet

__all__ = ["CompiledRule", "RuleBook", "RuleSet"]
