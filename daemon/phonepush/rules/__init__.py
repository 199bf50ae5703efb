"""Rules compiled once per load or reload: a :class:`RuleBook` of :class:`CompiledRule`."""

from phonepush.rules.book import RuleSet

__all__ = ["RuleSet"]
